"""``RoundEngine.handle``'s fast path (issue 18) decides exactly what the general path decides.

Every message here goes to two engines built alike: one with the fast path, one with it switched
off for the round (``_OpenRound.fast = False``). After each message both must give the same
outcome and counts, and the closed rounds the same record and the same weights to the bit. The
usual update must actually take the fast path (the general path's ``_authentic`` is not called),
and every refusal must name the general path's reason and count nothing but the refusal.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from nacl.public import Box
from nacl.utils import random as nacl_random

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import Outcome, RoundEngine
from fedge.protocol.framing import FRAME_VERSION, MAGIC, FrameKind
from fedge.protocol.messages import Evaluation
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import SealedHeader
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_KEYS,
    FLEET,
    T0,
    TOPICS,
    Device,
    P,
    delta_for,
    initial_state,
    make_engine,
    raw_payload_frame,
    settings,
)

DEVICES = ("dev-a", "dev-b", "dev-c")


def _frame(kind: FrameKind, raw_header: bytes, body: bytes) -> bytes:
    """A frame whose JSON header is written by hand (any spacing, key order, numbers)."""
    prefix = struct.pack(">4sBBHII", MAGIC, FRAME_VERSION, int(kind), 0, len(raw_header), len(body))
    return prefix + raw_header + body


def _canonical(header: SealedHeader) -> bytes:
    return json.dumps(header.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def seal_raw(header: SealedHeader, inner: bytes, *, cleartext: bytes | None = None) -> bytes:
    """``inner`` sealed by the header's device, under the cleartext header bytes ``cleartext``
    (default: the canonical JSON of ``header``, what ``seal`` writes)."""
    box = Box(DEVICE_KEYS[header.device_id], AGGREGATOR_KEY.public_key)
    encrypted = bytes(box.encrypt(inner, nacl_random(Box.NONCE_SIZE)))
    return _frame(FrameKind.SEALED, _canonical(header) if cleartext is None else cleartext, encrypted)


def payload_json(**fields: Any) -> bytes:
    """A canonical update payload header with ``fields`` changed (None values are kept)."""
    header: dict[str, Any] = {
        "codec": "fp32",
        "examples": 100,
        "train_loss": 0.5,
        "evaluation": {"examples": 20, "loss": 0.7, "accuracy": 0.8, "mse": None},
    }
    header.update(fields)
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def fp32(delta: np.ndarray) -> bytes:
    return delta.astype("<f4").tobytes()


@dataclass
class Pair:
    """The same round in two engines: ``fast`` with the fast path, ``general`` without."""

    fast: RoundEngine
    general: RoundEngine
    manifest: RoundManifest
    devices: dict[str, Device]

    def header(self, device: str, **changes: Any) -> SealedHeader:
        h = SealedHeader(
            FLEET,
            device,
            self.manifest.round_id,
            self.devices[device].counter + 1,
            "update",
            self.manifest.version,
        )
        return SealedHeader(**{**h.to_dict(), **changes})

    def send(self, device: str, payload: bytes, topic: str | None = None) -> Outcome:
        """``payload`` to both engines; both must decide alike. The fast engine's outcome."""
        t = TOPICS.update(device) if topic is None else topic
        a = self.fast.handle(t, payload, T0 + 1)
        b = self.general.handle(t, payload, T0 + 1)
        assert (a.accepted, a.reason, a.device_id, a.kind) == (b.accepted, b.reason, b.device_id, b.kind)
        assert self.fast.state.rejected_total == self.general.state.rejected_total
        ra, rb = self.fast.current, self.general.current
        assert ra is not None and rb is not None
        assert (ra.reported, ra.spent, dict(ra.rejected), ra.update_bytes) == (
            rb.reported,
            rb.spent,
            dict(rb.rejected),
            rb.update_bytes,
        )
        assert ra.folds.updates.raw_norms == rb.folds.updates.raw_norms
        assert ra.folds.updates.clipped == rb.folds.updates.clipped
        return a

    def usual(self, device: str, **kw: Any) -> bytes:
        return self.devices[device].update(self.manifest, **kw)

    def close(self) -> None:
        """Both rounds close alike: the same record, the same weights to the bit."""
        a, b = self.fast.close_round(), self.general.close_round()
        assert a.to_dict() == b.to_dict()
        assert np.array_equal(self.fast.state.weights, self.general.state.weights)
        assert self.fast.state.weights.tobytes() == self.general.state.weights.tobytes()


def make_pair(round_settings: RoundSettings | None = None, **state: Any) -> Pair:
    engines = []
    manifest = None
    for _ in range(2):
        eng = make_engine(round_settings or settings(min_devices=1), initial_state(**state), DEVICES)
        manifest = eng.open_round(T0).manifest
        engines.append(eng)
    assert manifest is not None
    fast, general = engines
    assert general.current is not None
    general.current.fast = False
    return Pair(fast, general, manifest, {d: Device(d) for d in DEVICES})


@contextmanager
def general_path_calls(engine: RoundEngine) -> Iterator[list[str]]:
    """The devices whose decrypted message the general path decided (``_authentic``)."""
    calls: list[str] = []
    original = engine._authentic

    def spy(r: Any, device: str, *args: Any) -> Outcome:
        calls.append(device)
        return original(r, device, *args)

    engine._authentic = spy  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del engine._authentic


def test_the_usual_update_takes_the_fast_path_and_aggregates_to_the_bit() -> None:
    pair = make_pair()
    with general_path_calls(pair.fast) as calls:
        for device, ev in zip(
            DEVICES,
            (Evaluation(20, 0.7, 0.8, None), None, Evaluation(30, 0.2, None, 0.04)),
            strict=True,
        ):
            assert pair.send(device, pair.usual(device, evaluation=ev, examples=50 + len(device))).accepted
    assert calls == []  # none of them needed the general path
    pair.close()


def test_many_rounds_with_clipping_give_the_same_model_to_the_bit() -> None:
    # The adaptive bound clips about half of the updates from the second round on.
    fast = make_engine(settings(min_devices=1, rounds=6), initial_state(), DEVICES)
    general = make_engine(settings(min_devices=1, rounds=6), initial_state(), DEVICES)
    devs = {d: Device(d) for d in DEVICES}
    clipped = 0
    for round_number in range(1, 6):
        m = fast.open_round(T0 + round_number).manifest
        assert general.open_round(T0 + round_number).manifest.round_id == m.round_id
        assert general.current is not None
        general.current.fast = False
        for i, d in enumerate(DEVICES):
            scale = 0.01 * (1 + i) * round_number
            msg = devs[d].update(m, delta_for(d, round_number, scale), examples=10 + i)
            assert fast.handle(TOPICS.update(d), msg, T0 + round_number).accepted
            assert general.handle(TOPICS.update(d), msg, T0 + round_number).accepted
        assert fast.current is not None
        clipped += fast.current.folds.updates.clipped
        assert fast.close_round().to_dict() == general.close_round().to_dict()
        assert fast.state.weights.tobytes() == general.state.weights.tobytes()
    assert clipped > 0


def _nan_delta() -> np.ndarray:
    d = delta_for("dev-a")
    d[7] = np.nan
    return d


def _inf_delta() -> np.ndarray:
    d = delta_for("dev-a")
    d[P - 1] = -np.inf
    return d


# Payload bodies and headers the fast path must hand to the general path (or decide alike).
ODD_PAYLOADS: dict[str, tuple[Callable[[], bytes], Callable[[], bytes], str]] = {
    # name: (payload header JSON, body, the general path's reason)
    "nan": (payload_json, lambda: fp32(_nan_delta()), "bad_tensor"),
    "inf": (payload_json, lambda: fp32(_inf_delta()), "bad_tensor"),
    "short body": (payload_json, lambda: fp32(delta_for("dev-a"))[:-4], "bad_tensor"),
    "long body": (payload_json, lambda: fp32(delta_for("dev-a")) + b"\0\0\0\0", "bad_tensor"),
    "nan loss": (
        lambda: payload_json(train_loss=0.5).replace(b"0.5}", b"NaN}"),
        lambda: fp32(delta_for("dev-a")),
        "payload_bad_header",
    ),
    "overflowing loss": (
        lambda: payload_json(train_loss=0.5).replace(b'"train_loss":0.5', b'"train_loss":1e999'),
        lambda: fp32(delta_for("dev-a")),
        "payload_bad_header",
    ),
    "overflowing accuracy": (
        lambda: payload_json().replace(b'"accuracy":0.8', b'"accuracy":1e999'),
        lambda: fp32(delta_for("dev-a")),
        "payload_bad_header",
    ),
    "accuracy over 1": (
        lambda: payload_json(evaluation={"examples": 20, "loss": 0.7, "accuracy": 1.5, "mse": None}),
        lambda: fp32(delta_for("dev-a")),
        "bad_schema",
    ),
    "negative mse": (
        lambda: payload_json(evaluation={"examples": 20, "loss": 0.7, "accuracy": None, "mse": -0.1}),
        lambda: fp32(delta_for("dev-a")),
        "bad_schema",
    ),
    "no examples": (lambda: payload_json(examples=0), lambda: fp32(delta_for("dev-a")), "bad_count"),
    "examples over 2^31": (
        lambda: payload_json(examples=2**31),
        lambda: fp32(delta_for("dev-a")),
        "bad_count",
    ),
    "too many examples": (
        lambda: payload_json(examples=1_000_001),
        lambda: fp32(delta_for("dev-a")),
        "too_many_examples",
    ),
    "evaluation of no examples": (
        lambda: payload_json(evaluation={"examples": 0, "loss": 0.7, "accuracy": 0.8, "mse": None}),
        lambda: fp32(delta_for("dev-a")),
        "bad_count",
    ),
    "another codec": (lambda: payload_json(codec="fp16"), lambda: fp32(delta_for("dev-a")), "wrong_codec"),
    "an extra key": (lambda: payload_json(extra=1), lambda: fp32(delta_for("dev-a")), "bad_schema"),
    "a clip indicator": (
        lambda: payload_json(clip_indicator=1),
        lambda: fp32(delta_for("dev-a")),
        "bad_schema",
    ),
    "a string count": (lambda: payload_json(examples="100"), lambda: fp32(delta_for("dev-a")), "bad_count"),
    "not an object": (lambda: b"[1,2]", lambda: fp32(delta_for("dev-a")), "bad_payload"),
    "trailing key": (
        lambda: payload_json() + b',"bind":{}',
        lambda: fp32(delta_for("dev-a")),
        "binding_mismatch",
    ),
}


@pytest.mark.parametrize("name", sorted(ODD_PAYLOADS))
def test_an_odd_payload_is_refused_for_the_general_path_s_reason_and_counts_nothing(name: str) -> None:
    make_header, make_body, reason = ODD_PAYLOADS[name]
    pair = make_pair()
    header = pair.header("dev-a")
    inner = raw_payload_frame(make_header(), make_body(), header)
    outcome = pair.send("dev-a", seal_raw(header, inner))
    assert (outcome.accepted, outcome.reason) == (False, reason)
    assert pair.fast.state.rejected_total == {reason: 1}
    r = pair.fast.current
    assert r is not None and r.reported == {} and r.update_bytes == 0
    assert r.folds.updates.raw_norms == [] and r.folds.metrics.examples == 0
    assert pair.send("dev-b", pair.usual("dev-b")).accepted  # the round goes on as before
    pair.close()


# Payloads the general path takes although fedge never writes them so: the fast path must not
# refuse them, only hand them over (or, for a number with an exponent, read it as json does).
UNUSUAL_BUT_VALID: dict[str, Callable[[], bytes]] = {
    "an integer loss": lambda: payload_json(train_loss=1),
    "spaces": lambda: json.dumps(json.loads(payload_json()), sort_keys=True).encode(),
    "keys in another order": lambda: json.dumps(json.loads(payload_json())).encode(),
    "an exponent": lambda: payload_json().replace(b'"train_loss":0.5', b'"train_loss":5e-1'),
    "an integer accuracy": lambda: payload_json(
        evaluation={"examples": 20, "loss": 0.7, "accuracy": 1, "mse": None}
    ),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL_BUT_VALID))
def test_an_unusual_but_valid_payload_is_accepted_as_the_general_path_accepts_it(name: str) -> None:
    pair = make_pair()
    header = pair.header("dev-a")
    inner = raw_payload_frame(UNUSUAL_BUT_VALID[name](), fp32(delta_for("dev-a")), header)
    with general_path_calls(pair.fast) as calls:
        assert pair.send("dev-a", seal_raw(header, inner)).accepted
    assert calls == ([] if name == "an exponent" else ["dev-a"])
    pair.close()


def test_a_non_canonical_cleartext_header_goes_the_general_way_and_is_accepted() -> None:
    pair = make_pair()
    header = pair.header("dev-a")
    spaced = json.dumps(header.to_dict()).encode()  # ", " and ": " between items
    inner = raw_payload_frame(payload_json(), fp32(delta_for("dev-a")), header)
    with general_path_calls(pair.fast) as calls:
        assert pair.send("dev-a", seal_raw(header, inner, cleartext=spaced)).accepted
    assert calls == ["dev-a"]
    pair.close()


@pytest.mark.parametrize(
    ("cleartext", "reason"),
    [
        (
            b'{"counter":01,"device_id":"dev-a","fleet":"fleet-1","kind":"update","model_version":1,"round_id":"r0001-v1"}',
            "frame_bad_header",
        ),
        (
            b'{"counter":9223372036854775808,"device_id":"dev-a","fleet":"fleet-1","kind":"update","model_version":1,"round_id":"r0001-v1"}',
            "bad_header",
        ),
        (
            b'{"counter":1,"device_id":"dev-a","fleet":"fleet-1","kind":"update","model_version":1,"round_id":"r0001-v1","x":1}',
            "bad_header",
        ),
        (
            b'{"counter":1,"device_id":"dev-b","fleet":"fleet-1","kind":"update","model_version":1,"round_id":"r0001-v1"}',
            "device_mismatch",
        ),
        (
            b'{"counter":1,"device_id":"dev-a","fleet":"fleet-2","kind":"update","model_version":1,"round_id":"r0001-v1"}',
            "wrong_fleet",
        ),
        (
            b'{"counter":1,"device_id":"dev-a","fleet":"fleet-1","kind":"update","model_version":2,"round_id":"r0001-v1"}',
            "wrong_version",
        ),
        (
            b'{"counter":1,"device_id":"dev-a","fleet":"fleet-1","kind":"update","model_version":1,"round_id":"r0001-v9"}',
            "wrong_round",
        ),
        (
            b'{"counter":1,"device_id":"dev-a","fleet":"fleet-1","kind":"moments","model_version":1,"round_id":"r0001-v1"}',
            "wrong_kind",
        ),
    ],
)
def test_a_bad_cleartext_header_is_refused_before_decryption_as_before(cleartext: bytes, reason: str) -> None:
    pair = make_pair()
    assert pair.manifest.round_id == "r0001-v1" and pair.manifest.version == 1
    header = pair.header("dev-a")
    inner = raw_payload_frame(payload_json(), fp32(delta_for("dev-a")), header)
    outcome = pair.send("dev-a", seal_raw(header, inner, cleartext=cleartext))
    assert (outcome.accepted, outcome.reason) == (False, reason)
    assert pair.fast.state.rejected_total == {reason: 1}
    assert pair.fast.current is not None and pair.fast.current.spent == {}  # its slot is not used up
    assert pair.send("dev-a", pair.usual("dev-a")).accepted
    pair.close()


def test_a_binding_of_another_counter_is_a_binding_mismatch() -> None:
    pair = make_pair()
    header = pair.header("dev-a")
    inner = raw_payload_frame(payload_json(), fp32(delta_for("dev-a")), pair.header("dev-a", counter=7))
    outcome = pair.send("dev-a", seal_raw(header, inner))
    assert (outcome.accepted, outcome.reason) == (False, "binding_mismatch")
    pair.close()


def test_an_altered_ciphertext_is_decrypt_failed_and_uses_up_nothing() -> None:
    pair = make_pair()
    good = bytearray(pair.usual("dev-a"))
    good[-1] ^= 0x01
    outcome = pair.send("dev-a", bytes(good))
    assert (outcome.accepted, outcome.reason, outcome.device_id, outcome.kind) == (
        False,
        "decrypt_failed",
        "dev-a",
        "update",
    )
    assert pair.fast.state.rejected_total == {"decrypt_failed": 1}
    assert pair.fast.current is not None and pair.fast.current.spent == {}
    pair.devices["dev-a"].counter -= 1  # the device sends its update again, same counter
    assert pair.send("dev-a", pair.usual("dev-a")).accepted
    pair.close()


def test_a_huge_but_finite_update_is_judged_like_before() -> None:
    # float32's largest values: their float64 squares sum without overflow, so the norm is
    # finite and the update is clipped (default bounds), not refused as non-finite.
    big = np.full(P, np.finfo(np.float32).max, np.float32)
    big[::2] *= -1
    pair = make_pair()
    outcome = pair.send("dev-a", pair.usual("dev-a", delta=big))
    assert outcome.accepted
    assert pair.fast.current is not None and pair.fast.current.folds.updates.clipped == 1
    assert pair.send("dev-b", pair.usual("dev-b")).accepted
    pair.close()


def test_an_update_over_the_hard_bound_is_norm_too_large_with_the_reject_policy() -> None:
    pair = make_pair(settings(min_devices=1, update_norm_policy="reject", max_update_norm=1.0))
    outcome = pair.send("dev-a", pair.usual("dev-a", delta=np.full(P, 1.0, np.float32)))
    assert (outcome.accepted, outcome.reason) == (False, "norm_too_large")
    r = pair.fast.current
    assert r is not None and r.spent == {"dev-a": 1} and r.reported == {} and r.folds.metrics.examples == 0
    assert pair.send("dev-b", pair.usual("dev-b")).accepted
    pair.close()


def test_a_duplicate_and_a_replayed_counter_are_refused_as_before() -> None:
    pair = make_pair()
    first = pair.usual("dev-a")
    assert pair.send("dev-a", first).accepted
    assert pair.send("dev-a", first).reason == "duplicate"
    assert pair.send("dev-a", pair.usual("dev-a")).reason == "duplicate"
    pair.close()


def test_a_message_on_another_device_s_topic_is_a_device_mismatch() -> None:
    pair = make_pair()
    outcome = pair.send("dev-a", pair.usual("dev-a"), topic=TOPICS.update("dev-b"))
    assert (outcome.accepted, outcome.reason) == (False, "device_mismatch")
    pair.close()


def test_an_fp32_delta_from_the_fast_path_is_a_read_only_view() -> None:
    # What a replica worker keeps of an update is the decoded payload: nobody may change it.
    pair = make_pair()
    eng = pair.fast
    r = eng.current
    assert r is not None
    kept: list[Any] = []

    class Batch:
        def __init__(self) -> None:
            self.accepted: dict[str, int] = {}
            self.spent: dict[str, int] = {}
            self.update_bytes = 0
            self.rejected: dict[str, int] = {}

        def keep(self, device: str, update: Any) -> None:
            kept.append(update)

    r.batch = Batch()  # type: ignore[assignment]
    delta = delta_for("dev-a")
    assert eng.handle(TOPICS.update("dev-a"), pair.usual("dev-a", delta=delta), T0 + 1).accepted
    (update,) = kept
    assert np.array_equal(update.delta, delta) and not update.delta.flags.writeable
    assert r.batch.accepted == {"dev-a": 1}  # type: ignore[attr-defined]


def test_a_new_aggregator_key_leaves_no_shared_key_of_the_old_one_behind() -> None:
    from nacl.public import PrivateKey

    pair = make_pair()
    assert pair.send("dev-a", pair.usual("dev-a")).accepted  # the fast path keeps dev-a's shared key
    pair.close()
    new_key = PrivateKey.generate()
    for eng in (pair.fast, pair.general):
        eng.box_key = new_key
        pair.manifest = eng.open_round(T0 + 1).manifest
    assert pair.general.current is not None
    pair.general.current.fast = False
    outcome = pair.send("dev-a", pair.usual("dev-a"))  # sealed to the old key: must not open
    assert (outcome.accepted, outcome.reason) == (False, "decrypt_failed")
    header = pair.header("dev-a", counter=pair.devices["dev-a"].counter)  # sent again, same counter
    box = Box(DEVICE_KEYS["dev-a"], new_key.public_key)
    inner = raw_payload_frame(payload_json(), fp32(delta_for("dev-a")), header)
    sealed = _frame(FrameKind.SEALED, _canonical(header), bytes(box.encrypt(inner, nacl_random(24))))
    assert pair.send("dev-a", sealed).accepted
    pair.close()


def test_a_buffer_that_is_not_bytes_goes_the_general_way() -> None:
    pair = make_pair()
    with general_path_calls(pair.fast) as calls:
        assert pair.send("dev-a", bytearray(pair.usual("dev-a"))).accepted  # type: ignore[arg-type]
    assert calls == ["dev-a"]
    pair.close()


@pytest.mark.parametrize(
    ("changes", "fast"),
    [
        ({"strategy": "fedadam", "server_learning_rate": 0.1}, True),  # a server optimizer on the mean
        ({"weighting": "examples"}, True),
        ({"strategy": "median"}, False),  # robust strategies keep every update: the general path
        ({"aggregation": "async", "buffer_size": 3, "max_staleness": 2}, False),
    ],
)
def test_other_strategies_decide_and_aggregate_alike(changes: dict[str, Any], fast: bool) -> None:
    pair = make_pair(settings(min_devices=1, **changes), claim_median=50.0)
    with general_path_calls(pair.fast) as calls:
        for i, device in enumerate(DEVICES):
            assert pair.send(device, pair.usual(device, examples=40 + 20 * i)).accepted
    assert calls == ([] if fast else list(DEVICES))
    pair.close()
