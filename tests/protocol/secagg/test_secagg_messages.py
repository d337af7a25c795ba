"""Wire encodings: canonical JSON round trips, and bounded, typed refusals of bad input."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import Fleet, make_config

from fedge.protocol.errors import FieldError
from fedge.protocol.secagg import (
    Advertisement,
    AdvertisementBundle,
    MaskedInput,
    RoundConfig,
    SecAggError,
    SecAggReason,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
)

CONFIG = make_config(10, vector_length=5, bits=20)


def _messages() -> dict[str, Any]:
    fleet = Fleet(CONFIG)
    bundles = fleet.advertise()
    device = fleet.devices["dev-000"]
    shares = device.on_advertisements(bundles["dev-000"], 1011.0)
    for d in CONFIG.device_ids[1:]:
        fleet.aggregator.on_shares(fleet.devices[d].on_advertisements(bundles[d], 1011.0), 1011.0)
    fleet.aggregator.on_shares(shares, 1011.0)
    deliveries = fleet.aggregator.close_sharing(1021.0)
    device.on_shares(deliveries["dev-000"], 1021.0)
    masked = device.mask(fleet.quantised["dev-000"], 1021.0)
    request = UnmaskRequest("r-1", "dev-000", tuple(sorted(device.partners)), ())
    response = device.on_unmask_request(request, 1031.0)
    return {
        "ad": bundles["dev-000"].advertisements[0],
        "bundle": bundles["dev-000"],
        "shares": shares,
        "delivery": deliveries["dev-000"],
        "masked": masked,
        "request": request,
        "response": response,
    }


MESSAGES = _messages()


def test_every_message_round_trips_through_canonical_json() -> None:
    assert RoundConfig.decode(CONFIG.encode()) == CONFIG
    ad = MESSAGES["ad"]
    assert Advertisement.decode(ad.encode()) == ad
    for key, cls in (
        ("bundle", AdvertisementBundle),
        ("shares", ShareMessage),
        ("delivery", ShareDelivery),
        ("request", UnmaskRequest),
        ("response", UnmaskResponse),
    ):
        message = MESSAGES[key]
        data = message.encode()
        assert cls.decode(data, CONFIG) == message
        assert json.loads(data) == json.loads(json.dumps(json.loads(data), sort_keys=True))
    masked = MESSAGES["masked"]
    back = MaskedInput.decode(masked.encode(CONFIG.bits), CONFIG)
    np.testing.assert_array_equal(back.vector, masked.vector)
    assert back.partners == masked.partners


def _decoders() -> list[tuple[str, Any]]:
    return [
        ("bundle", lambda b: AdvertisementBundle.decode(b, CONFIG)),
        ("shares", lambda b: ShareMessage.decode(b, CONFIG)),
        ("delivery", lambda b: ShareDelivery.decode(b, CONFIG)),
        ("masked", lambda b: MaskedInput.decode(b, CONFIG)),
        ("request", lambda b: UnmaskRequest.decode(b, CONFIG)),
        ("response", lambda b: UnmaskResponse.decode(b, CONFIG)),
    ]


def _encoded(key: str) -> bytes:
    message = MESSAGES[key]
    return bytes(message.encode(CONFIG.bits) if key == "masked" else message.encode())


@pytest.mark.parametrize(("key", "decode"), _decoders())
def test_oversized_messages_are_refused_before_parsing(key: str, decode: Any) -> None:
    huge = _encoded(key)[:-1] + b" " * 2_000_000 + b"}"
    with pytest.raises(SecAggError) as caught:
        decode(huge)
    assert caught.value.reason == SecAggReason.TOO_LARGE


@pytest.mark.parametrize(("key", "decode"), _decoders())
def test_messages_off_their_schema_are_refused(key: str, decode: Any) -> None:
    document = json.loads(_encoded(key))
    variants = [
        {**document, "extra": 1},
        {k: v for k, v in document.items() if k != "round_id"},
        {**document, "type": "secagg-other"},
        {**document, "round_id": "bad/round"},
        [document],
    ]
    for variant in variants:
        with pytest.raises(SecAggError) as caught:
            decode(json.dumps(variant).encode())
        assert caught.value.reason in {SecAggReason.BAD_MESSAGE, SecAggReason.TOO_LARGE}
        assert isinstance(caught.value, FieldError)


def test_too_many_ids_or_shares_are_refused_before_they_are_checked() -> None:
    request = json.loads(_encoded("request"))
    request["alive"] = [f"x{i}" for i in range(CONFIG.degree + 1)]
    with pytest.raises(SecAggError) as caught:
        UnmaskRequest.decode(json.dumps(request).encode(), CONFIG)
    assert caught.value.reason == SecAggReason.TOO_LARGE
    response = json.loads(_encoded("response"))
    share = next(iter(response["self_mask_shares"].values()))
    response["self_mask_shares"] = {f"x{i}": share for i in range(CONFIG.degree + 1)}
    with pytest.raises(SecAggError) as caught:
        UnmaskResponse.decode(json.dumps(response).encode(), CONFIG)
    assert caught.value.reason == SecAggReason.TOO_LARGE


def test_a_vector_of_the_wrong_length_or_range_is_refused() -> None:
    document = json.loads(_encoded("masked"))
    raw = base64.b64decode(document["vector"])
    for bad in (raw[:-3], raw + b"\x00\x00\x00", raw[:-1] + b"\xff"):  # 20 bits in 3 bytes
        document["vector"] = base64.b64encode(bad).decode()
        with pytest.raises(SecAggError) as caught:
            MaskedInput.decode(json.dumps(document).encode(), CONFIG)
        assert caught.value.reason in {SecAggReason.BAD_MESSAGE, SecAggReason.BAD_VECTOR}


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_secagg_errors(data: bytes) -> None:
    for _, decode in _decoders():
        with contextlib.suppress(SecAggError):
            decode(data)
    with contextlib.suppress(SecAggError):
        Advertisement.decode(data)
    with contextlib.suppress(SecAggError):
        RoundConfig.decode(data)


def test_a_config_off_the_protocol_is_refused() -> None:
    document = CONFIG.to_dict()
    for change in (
        {"device_ids": ["b", "a", "c"]},
        {"threshold": 1},
        {"bits": 70},
        {"vector_length": 0},
        {"graph_seed": "AAAA"},
        {"deadlines": {"advertise": 2.0, "share": 1.0, "masked_input": 3.0, "unmask": 4.0}},
    ):
        with pytest.raises(SecAggError):
            RoundConfig.decode(json.dumps({**document, **change}).encode())
