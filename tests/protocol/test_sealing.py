"""Sealed device messages: confidentiality, authentication of both ends, and header binding.

Everything here uses real X25519 keys. A sealed message that was altered, opened with the wrong
key, or re-labelled with another device, round or counter must never open; every refusal is a
:class:`SealError` with a stable reason.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from fedge.protocol.codec import Codec
from fedge.protocol.errors import FedgeError
from fedge.protocol.framing import FrameKind, decode_frame, encode_frame
from fedge.protocol.messages import Evaluation, decode_update, encode_update
from fedge.protocol.model_manifest import mlp_tensor_layout
from fedge.protocol.sealing import (
    MAC_BYTES,
    MESSAGE_KINDS,
    NONCE_BYTES,
    SealedHeader,
    SealError,
    key_to_text,
    open_sealed,
    private_key_from_text,
    public_key_from_text,
    read_header,
    seal,
)

DEVICE = PrivateKey.generate()
OTHER_DEVICE = PrivateKey.generate()
AGGREGATOR = PrivateKey.generate()
OTHER_AGGREGATOR = PrivateKey.generate()
HEADER = SealedHeader(
    fleet="fleet-1", device_id="watch-01", round_id="r-7", counter=42, kind="update", model_version=3
)
PAYLOAD_HEADER = {"marker": "visible-marker-123", "n": [1, 2, 3]}
PAYLOAD_BODY = b"SECRET-PAYLOAD-BYTES-" * 3
# The point of order 8 on Curve25519: X25519 with it yields the all-zero shared secret.
LOW_ORDER_POINT = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def _seal(
    header: SealedHeader = HEADER, device: PrivateKey = DEVICE, aggregator: PublicKey | None = None
) -> bytes:
    return seal(header, PAYLOAD_HEADER, PAYLOAD_BODY, device, aggregator or AGGREGATOR.public_key)


def _open(data: bytes, aggregator: PrivateKey = AGGREGATOR, device: PublicKey | None = None) -> Any:
    header, ciphertext = read_header(data)
    return open_sealed(header, ciphertext, aggregator, device or DEVICE.public_key)


def _seal_error(call: Any, *args: Any) -> SealError:
    with pytest.raises(SealError) as exc:
        call(*args)
    assert str(exc.value).startswith(exc.value.reason + ": ")
    return exc.value


def _relabel(data: bytes, **changes: Any) -> bytes:
    """The same ciphertext behind an edited cleartext header (what an attacker can do)."""
    frame = decode_frame(data, FrameKind.SEALED)
    return encode_frame(FrameKind.SEALED, {**frame.header, **changes}, frame.body)


def _inner_sealed(inner: bytes, header: SealedHeader = HEADER) -> bytes:
    """A sealed message whose plaintext is ``inner``, correctly encrypted by the device."""
    ciphertext = Box(DEVICE, AGGREGATOR.public_key).encrypt(inner)
    return encode_frame(FrameKind.SEALED, header.to_dict(), bytes(ciphertext))


# --- round trip ------------------------------------------------------------------------------


def test_seal_read_header_open_round_trip() -> None:
    data = _seal()
    header, ciphertext = read_header(data)
    assert header == HEADER
    payload, body = open_sealed(header, ciphertext, AGGREGATOR, DEVICE.public_key)
    assert payload == PAYLOAD_HEADER
    assert body == PAYLOAD_BODY


def test_sealed_frame_layout_nonce_and_ciphertext_size() -> None:
    nonce = bytes(range(NONCE_BYTES))
    data = seal(HEADER, PAYLOAD_HEADER, PAYLOAD_BODY, DEVICE, AGGREGATOR.public_key, nonce=nonce)
    frame = decode_frame(data, FrameKind.SEALED)
    assert frame.header == HEADER.to_dict()
    inner_header = {"bind": HEADER.to_dict(), "payload": PAYLOAD_HEADER}
    inner = encode_frame(FrameKind.PAYLOAD, inner_header, PAYLOAD_BODY)
    assert frame.body[:NONCE_BYTES] == nonce
    assert len(frame.body) == NONCE_BYTES + MAC_BYTES + len(inner)
    assert Box(AGGREGATOR, DEVICE.public_key).decrypt(frame.body) == inner


def test_a_fixed_nonce_is_reproducible_and_a_random_one_is_not() -> None:
    nonce = b"\x01" * NONCE_BYTES
    fixed = [seal(HEADER, {}, b"x", DEVICE, AGGREGATOR.public_key, nonce=nonce) for _ in range(2)]
    assert fixed[0] == fixed[1]
    assert _seal() != _seal()


def test_ciphertext_does_not_contain_the_payload() -> None:
    data = _seal()
    _, ciphertext = read_header(data)
    for secret in (PAYLOAD_BODY, b"SECRET-PAYLOAD", b"visible-marker-123", b'"bind"', b'"payload"'):
        assert secret not in data
        assert secret not in ciphertext


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_every_message_kind_round_trips(kind: str) -> None:
    header = SealedHeader("f", "d", "r", 0, kind, 0)
    assert _open(_seal(header)) == (PAYLOAD_HEADER, PAYLOAD_BODY)


def test_a_sealed_update_carries_an_encoded_update_end_to_end() -> None:
    layout = mlp_tensor_layout((4, 3, 2))
    delta = np.linspace(-1, 1, 23, dtype=np.float32)
    evaluation = Evaluation(examples=10, loss=0.5, accuracy=0.75, mse=None)
    payload_header, body = encode_update(delta, layout, Codec.FP32, 120, 0.25, evaluation)
    data = seal(HEADER, payload_header, body, DEVICE, AGGREGATOR.public_key)
    header, ciphertext = read_header(data)
    opened_header, opened_body = open_sealed(header, ciphertext, AGGREGATOR, DEVICE.public_key)
    update = decode_update(opened_header, opened_body, layout, Codec.FP32)
    assert np.array_equal(update.delta, delta)
    assert (update.examples, update.train_loss, update.evaluation) == (120, 0.25, evaluation)


# --- wrong keys ------------------------------------------------------------------------------


def test_opening_with_another_devices_key_fails() -> None:
    err = _seal_error(_open, _seal(), AGGREGATOR, OTHER_DEVICE.public_key)
    assert err.reason == "decrypt_failed"
    assert str(err) == "decrypt_failed: not sealed by this device for this aggregator, or altered"


def test_opening_with_another_aggregators_key_fails() -> None:
    assert _seal_error(_open, _seal(), OTHER_AGGREGATOR, DEVICE.public_key).reason == "decrypt_failed"


def test_a_message_sealed_for_another_aggregator_does_not_open() -> None:
    data = _seal(aggregator=OTHER_AGGREGATOR.public_key)
    assert _seal_error(_open, data).reason == "decrypt_failed"


def test_a_device_cannot_speak_for_another_one() -> None:
    """OTHER_DEVICE seals claiming to be watch-01; the aggregator opens with watch-01's key."""
    assert _seal_error(_open, _seal(device=OTHER_DEVICE)).reason == "decrypt_failed"


# --- tampering ----------------------------------------------------------------------------------


def test_every_single_byte_change_of_a_sealed_message_is_refused() -> None:
    """Each byte XORed with several masks: nothing ever opens, and each region fails its own way."""
    data = _seal()
    frame = decode_frame(data, FrameKind.SEALED)
    header_end = len(data) - len(frame.body)
    reasons: dict[str, int] = {}
    for position in range(len(data)):
        for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[position] ^= mask
            try:
                header, ciphertext = read_header(bytes(mutated))
            except SealError as exc:
                assert position < header_end, f"byte {position}: ciphertext change refused as {exc.reason}"
                assert exc.reason.startswith("frame_") or exc.reason == "bad_header"
                reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
                continue
            with pytest.raises(SealError) as exc_info:
                open_sealed(header, ciphertext, AGGREGATOR, DEVICE.public_key)
            reason = exc_info.value.reason
            if position < header_end:  # cleartext header edited, still valid: the binding catches it
                assert header != HEADER
                assert reason == "binding_mismatch", f"byte {position} mask {mask:#x}"
            else:  # nonce, ciphertext or MAC changed
                assert header == HEADER
                assert reason == "decrypt_failed", f"byte {position} mask {mask:#x}"
            reasons[reason] = reasons.get(reason, 0) + 1
    # Every region was really exercised.
    for expected in (
        "frame_bad_magic",
        "frame_unsupported_version",
        "frame_wrong_kind",
        "frame_bad_reserved",
        "frame_length_mismatch",
        "frame_bad_header",
        "bad_header",
        "binding_mismatch",
        "decrypt_failed",
    ):
        assert reasons.get(expected, 0) > 0, expected
    assert reasons["decrypt_failed"] == 9 * len(frame.body)


@pytest.mark.parametrize(
    "changes",
    [
        {"round_id": "r-8"},
        {"counter": 43},
        {"counter": 0},
        {"device_id": "watch-02"},
        {"fleet": "fleet-2"},
        {"kind": "moments"},
        {"model_version": 4},
        {"round_id": "r-8", "counter": 1},
    ],
    ids=["round", "counter", "counter zero", "device", "fleet", "kind", "model version", "round and counter"],
)
def test_a_relabelled_cleartext_header_is_a_binding_mismatch(changes: dict[str, Any]) -> None:
    data = _relabel(_seal(), **changes)
    header, ciphertext = read_header(data)
    assert header == SealedHeader(**{**HEADER.to_dict(), **changes})
    err = _seal_error(open_sealed, header, ciphertext, AGGREGATOR, DEVICE.public_key)
    assert err.reason == "binding_mismatch"
    assert str(err) == "binding_mismatch: the sealed header differs from the cleartext header"


def test_a_message_replayed_into_the_next_round_by_its_own_device_is_refused() -> None:
    old = _seal()
    replay = _relabel(old, round_id="r-8", counter=HEADER.counter + 1)
    assert _seal_error(_open, replay).reason == "binding_mismatch"


def test_a_ciphertext_spliced_from_another_message_is_refused() -> None:
    first, second = _seal(), _seal(SealedHeader("fleet-1", "watch-01", "r-7", 43, "update", 3))
    spliced = encode_frame(FrameKind.SEALED, HEADER.to_dict(), decode_frame(second, FrameKind.SEALED).body)
    assert _open(first) == (PAYLOAD_HEADER, PAYLOAD_BODY)
    assert _seal_error(_open, spliced).reason == "binding_mismatch"


# --- read_header and the inner frame ---------------------------------------------------------


def test_read_header_reports_frame_errors_with_a_frame_prefix() -> None:
    assert _seal_error(read_header, b"").reason == "frame_truncated"
    assert _seal_error(read_header, b"XXXX" + _seal()[4:]).reason == "frame_bad_magic"
    signed_kind = encode_frame(FrameKind.SIGNED, HEADER.to_dict(), bytes(64))
    assert _seal_error(read_header, signed_kind).reason == "frame_wrong_kind"
    assert _seal_error(read_header, _seal() + b"x").reason == "frame_length_mismatch"


def test_read_header_enforces_max_body() -> None:
    data = _seal()
    body_len = len(decode_frame(data, FrameKind.SEALED).body)
    assert read_header(data, max_body=body_len)[0] == HEADER
    err = _seal_error(read_header, data, body_len - 1)
    assert err.reason == "frame_body_too_large"
    assert str(err) == (
        f"frame_body_too_large: body_too_large: declares a {body_len}-byte body > {body_len - 1}"
    )


@pytest.mark.parametrize("size", [0, 1, NONCE_BYTES, NONCE_BYTES + MAC_BYTES - 1])
def test_read_header_refuses_a_body_shorter_than_nonce_and_mac(size: int) -> None:
    data = encode_frame(FrameKind.SEALED, HEADER.to_dict(), bytes(size))
    err = _seal_error(read_header, data)
    assert err.reason == "truncated"
    assert str(err) == "truncated: ciphertext shorter than nonce + MAC"


def test_read_header_accepts_exactly_nonce_and_mac_but_it_does_not_open() -> None:
    header, ciphertext = read_header(encode_frame(FrameKind.SEALED, HEADER.to_dict(), bytes(40)))
    assert header == HEADER
    err = _seal_error(open_sealed, header, ciphertext, AGGREGATOR, DEVICE.public_key)
    assert err.reason == "decrypt_failed"


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (b"garbage", "payload_truncated"),
        (
            b"XXXX" + encode_frame(FrameKind.PAYLOAD, {"bind": HEADER.to_dict(), "payload": {}})[4:],
            "payload_bad_magic",
        ),
        (encode_frame(FrameKind.SEALED, {"bind": HEADER.to_dict(), "payload": {}}), "payload_wrong_kind"),
        (
            encode_frame(FrameKind.PAYLOAD, {"bind": HEADER.to_dict(), "payload": {}}, b"x") + b"y",
            "payload_length_mismatch",
        ),
    ],
    ids=["not a frame", "bad magic", "sealed kind inside", "length"],
)
def test_an_inner_frame_error_has_a_payload_prefix(inner: bytes, reason: str) -> None:
    assert _seal_error(_open, _inner_sealed(inner)).reason == reason


def test_open_enforces_max_body_on_the_inner_frame() -> None:
    data = _seal()
    header, ciphertext = read_header(data)
    opened = open_sealed(header, ciphertext, AGGREGATOR, DEVICE.public_key, len(PAYLOAD_BODY))
    assert opened == (PAYLOAD_HEADER, PAYLOAD_BODY)
    err = _seal_error(open_sealed, header, ciphertext, AGGREGATOR, DEVICE.public_key, len(PAYLOAD_BODY) - 1)
    assert err.reason == "payload_body_too_large"


@pytest.mark.parametrize(
    "inner_header",
    [
        {"payload": {}},
        {"bind": None, "payload": {}},
        {"bind": {**HEADER.to_dict(), "counter": 41}, "payload": {}},
        {"bind": {**HEADER.to_dict(), "extra": 1}, "payload": {}},
    ],
    ids=["no bind", "null bind", "other counter", "extra bind field"],
)
def test_an_inner_binding_that_differs_is_refused(inner_header: dict[str, Any]) -> None:
    inner = encode_frame(FrameKind.PAYLOAD, inner_header)
    assert _seal_error(_open, _inner_sealed(inner)).reason == "binding_mismatch"


@pytest.mark.parametrize(
    "inner_header",
    [
        {"bind": HEADER.to_dict()},
        {"bind": HEADER.to_dict(), "payload": None},
        {"bind": HEADER.to_dict(), "payload": [1]},
        {"bind": HEADER.to_dict(), "payload": "text"},
        {"bind": HEADER.to_dict(), "payload": {}, "extra": 1},
    ],
    ids=["no payload", "null payload", "list payload", "string payload", "extra key"],
)
def test_a_malformed_inner_payload_is_refused(inner_header: dict[str, Any]) -> None:
    err = _seal_error(_open, _inner_sealed(encode_frame(FrameKind.PAYLOAD, inner_header)))
    assert err.reason == "bad_payload"
    assert str(err) == "bad_payload: payload header must be an object"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_seal_error(data: bytes) -> None:
    try:
        header, ciphertext = read_header(data)
    except SealError as exc:
        assert exc.reason.startswith("frame_") or exc.reason in {"bad_header", "truncated"}
        return
    with pytest.raises(SealError):
        open_sealed(header, ciphertext, AGGREGATOR, DEVICE.public_key)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(sorted(HEADER.to_dict())) | st.text(max_size=4),
        st.none() | st.booleans() | st.integers() | st.text(max_size=6),
        max_size=7,
    )
)
def test_arbitrary_cleartext_headers_only_raise_seal_error(header: dict[str, Any]) -> None:
    data = encode_frame(FrameKind.SEALED, header, bytes(48))
    try:
        parsed, _ = read_header(data)
    except SealError as exc:
        assert exc.reason == "bad_header"
        return
    assert parsed.to_dict() == header


# --- SealedHeader validation --------------------------------------------------------------------


def _from_dict_error(data: Any) -> str:
    err = _seal_error(SealedHeader.from_dict, data)
    assert err.reason == "bad_header"
    return str(err)


def test_sealed_header_dict_round_trip_and_limits() -> None:
    assert SealedHeader.from_dict(HEADER.to_dict()) == HEADER
    edge = {**HEADER.to_dict(), "counter": 2**63 - 1, "model_version": 0}
    assert SealedHeader.from_dict(edge).to_dict() == edge


_FIELDS_ERROR = (
    "bad_header: sealed header must have exactly "
    "['counter', 'device_id', 'fleet', 'kind', 'model_version', 'round_id']"
)


@pytest.mark.parametrize("missing", sorted(HEADER.to_dict()))
def test_sealed_header_refuses_a_missing_field(missing: str) -> None:
    data = HEADER.to_dict()
    del data[missing]
    assert _from_dict_error(data) == _FIELDS_ERROR


@pytest.mark.parametrize("data", [{**HEADER.to_dict(), "extra": 1}, {}, [], None, "header", 42], ids=repr)
def test_sealed_header_refuses_extra_fields_and_non_objects(data: Any) -> None:
    assert _from_dict_error(data) == _FIELDS_ERROR


@pytest.mark.parametrize("key", ["counter", "model_version"])
@pytest.mark.parametrize("value", [True, False, -1, 2**63, 2**64, 1.0, "1", None, [1]], ids=repr)
def test_sealed_header_refuses_bad_integers(key: str, value: Any) -> None:
    assert _from_dict_error({**HEADER.to_dict(), key: value}) == (
        f"bad_header: {key} must be an integer in 0..2^63-1"
    )


@pytest.mark.parametrize("key", ["fleet", "device_id", "round_id", "kind"])
@pytest.mark.parametrize("value", [None, 1, b"x", ["x"]], ids=repr)
def test_sealed_header_refuses_non_string_fields(key: str, value: Any) -> None:
    assert _from_dict_error({**HEADER.to_dict(), key: value}) == f"bad_header: {key} must be a string"


@pytest.mark.parametrize(
    ("key", "what"), [("fleet", "fleet id"), ("device_id", "device id"), ("round_id", "round id")]
)
@pytest.mark.parametrize("value", ["", "a/b", "+", "#", "x\n", "x" * 65, "_x"])
def test_sealed_header_refuses_bad_ids(key: str, what: str, value: str) -> None:
    assert _from_dict_error({**HEADER.to_dict(), key: value}) == (
        f"bad_header: invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-'"
    )


@pytest.mark.parametrize("kind", ["status", "manifest", "Update", "update\n", ""])
def test_sealed_header_refuses_an_unknown_kind(kind: str) -> None:
    assert _from_dict_error({**HEADER.to_dict(), "kind": kind}) == (
        "bad_header: kind must be one of ('update', 'moments', "
        "'secagg_advertise', 'secagg_shares', 'secagg_masked', 'secagg_unmask', 'chunk')"
    )


@pytest.mark.parametrize(
    "header",
    [
        SealedHeader("fleet-1", "a/b", "r", 1, "update", 0),
        SealedHeader("fleet-1", "d", "r", True, "update", 0),  # type: ignore[arg-type]
        SealedHeader("fleet-1", "d", "r", -1, "update", 0),
        SealedHeader("fleet-1", "d", "r", 1, "status", 0),
    ],
    ids=["bad device", "bool counter", "negative counter", "bad kind"],
)
def test_seal_refuses_to_claim_an_invalid_header(header: SealedHeader) -> None:
    assert _seal_error(_seal, header).reason == "bad_header"


def test_seal_error_is_a_fedge_error() -> None:
    assert issubclass(SealError, FedgeError)


# --- keys as text -------------------------------------------------------------------------------


def test_key_text_round_trips() -> None:
    public_text, private_text = key_to_text(DEVICE.public_key), key_to_text(DEVICE)
    assert base64.b64decode(public_text) == bytes(DEVICE.public_key)
    assert len(public_text) == 44
    assert public_key_from_text(public_text) == DEVICE.public_key
    assert bytes(private_key_from_text(private_text)) == bytes(DEVICE)
    assert private_key_from_text(private_text).public_key == DEVICE.public_key
    assert public_key_from_text(f"  {public_text}\n") == DEVICE.public_key  # as read from a file


@pytest.mark.parametrize("parse", [public_key_from_text, private_key_from_text], ids=["public", "private"])
@pytest.mark.parametrize(
    "text",
    ["not base64!", "@@@@", "abc", "ab=c", "é" * 44, "YWJj\x00"],
    ids=["punctuation", "symbols", "bad padding", "inner padding", "non-ascii", "nul"],
)
def test_key_text_refuses_bad_base64(parse: Any, text: str) -> None:
    err = _seal_error(parse, text)
    what = "public key" if parse is public_key_from_text else "private key"
    assert err.reason == "bad_key"
    assert str(err) == f"bad_key: {what} is not base64"


@pytest.mark.parametrize("parse", [public_key_from_text, private_key_from_text], ids=["public", "private"])
@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_text_refuses_the_wrong_length(parse: Any, size: int) -> None:
    err = _seal_error(parse, base64.b64encode(b"\x07" * size).decode())
    what = "public key" if parse is public_key_from_text else "private key"
    assert err.reason == "bad_key"
    assert str(err) == f"bad_key: {what} must be 32 bytes, got {size}"


def test_an_all_zero_public_key_is_refused() -> None:
    err = _seal_error(public_key_from_text, base64.b64encode(bytes(32)).decode())
    assert err.reason == "bad_key"
    assert str(err) == "bad_key: public key is all zeros"


def test_opening_with_a_low_order_device_key_is_a_clean_bad_key() -> None:
    """PyNaCl refuses the Box (nacl.exceptions.RuntimeError, a CryptoError); open maps it."""
    header, ciphertext = read_header(_seal())
    err = _seal_error(open_sealed, header, ciphertext, AGGREGATOR, PublicKey(LOW_ORDER_POINT))
    assert err.reason == "bad_key"


def test_a_low_order_public_key_is_refused_as_text() -> None:
    err = _seal_error(public_key_from_text, base64.b64encode(LOW_ORDER_POINT).decode())
    assert err.reason == "bad_key"


@pytest.mark.parametrize("point", [LOW_ORDER_POINT, bytes(32)], ids=["order 8", "all zeros"])
def test_sealing_for_a_low_order_aggregator_key_is_a_seal_error(point: bytes) -> None:
    with pytest.raises(SealError):
        _seal(aggregator=PublicKey(point))


@pytest.mark.parametrize("point", [LOW_ORDER_POINT, bytes(32)], ids=["order 8", "all zeros"])
def test_pynacl_refuses_a_box_with_a_low_order_key_with_a_crypto_error(point: bytes) -> None:
    """What PyNaCl raises (so sealing can map it): nacl.exceptions.RuntimeError, a CryptoError."""
    from nacl.exceptions import CryptoError
    from nacl.exceptions import RuntimeError as NaclRuntimeError

    with pytest.raises(NaclRuntimeError, match=r"^Unexpected library error$") as exc:
        Box(DEVICE, PublicKey(point))
    assert isinstance(exc.value, CryptoError)
    assert not isinstance(exc.value, FedgeError)


def test_the_inner_payload_header_is_bound_json() -> None:
    """The plaintext inside really repeats the cleartext header under 'bind'."""
    _, ciphertext = read_header(_seal())
    inner = decode_frame(Box(AGGREGATOR, DEVICE.public_key).decrypt(ciphertext), FrameKind.PAYLOAD)
    assert inner.header == {"bind": HEADER.to_dict(), "payload": PAYLOAD_HEADER}
    assert json.loads(json.dumps(inner.header)) == inner.header
