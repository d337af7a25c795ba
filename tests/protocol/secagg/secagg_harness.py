"""An in-memory fleet for secure-aggregation tests: real crypto, no I/O, fixed randomness.

Not collected (no ``test_`` prefix); test modules import it by name (pytest puts this folder on
``sys.path`` for them, as for any test folder without an ``__init__.py``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import randombytes_deterministic

from fedge.protocol.secagg import (
    AggregatorSession,
    Deadlines,
    DeviceSession,
    RoundConfig,
    SecAggError,
    SecAggResult,
)
from fedge.protocol.secagg import messages as m
from fedge.protocol.secagg.advertisement import Advertisement
from fedge.protocol.secagg.params import choose_parameters

START = 1_000.0
PHASE = 10.0
DEADLINES = Deadlines.every(START, PHASE)
#: A time inside each phase (advertise, share, masked input, unmask).
T_ADVERTISE, T_SHARE, T_INPUT, T_UNMASK = (START + PHASE * i + 1 for i in range(4))


def fixed_random(label: str) -> Callable[[int], bytes]:
    """A reproducible ``random_bytes``: ChaCha20 streams keyed by ``label`` and a counter."""
    counter = itertools.count()

    def draw(size: int) -> bytes:
        key = hashlib.blake2b(f"{label}/{next(counter)}".encode(), digest_size=32).digest()
        return randombytes_deterministic(size, key)

    return draw


def make_config(
    n: int,
    *,
    degree: int | None = None,
    threshold: int | None = None,
    vector_length: int = 24,
    bits: int = 32,
    clip_norm: float = 1.0,
    round_id: str = "r-1",
    seed: bytes = b"\x07" * 32,
) -> RoundConfig:
    params = choose_parameters(n)
    return RoundConfig(
        round_id=round_id,
        device_ids=tuple(sorted(f"dev-{i:03d}" for i in range(n))),
        graph_seed=seed,
        degree=params.degree if degree is None else degree,
        threshold=params.threshold if threshold is None else threshold,
        vector_length=vector_length,
        bits=bits,
        clip_norm=clip_norm,
        deadlines=DEADLINES,
    )


def _ignore(step: str) -> None:
    del step


def identity_key(device_id: str) -> SigningKey:
    return SigningKey(hashlib.blake2b(f"identity/{device_id}".encode(), digest_size=32).digest())


@dataclass
class Fleet:
    """Devices, their updates and an aggregator for one round."""

    config: RoundConfig
    seed: int = 0
    devices: dict[str, DeviceSession] = field(init=False)
    aggregator: AggregatorSession = field(init=False)
    updates: dict[str, npt.NDArray[np.float64]] = field(init=False)
    quantised: dict[str, npt.NDArray[np.uint64]] = field(init=False)
    verify_keys: dict[str, VerifyKey] = field(init=False)

    def __post_init__(self) -> None:
        ids = self.config.device_ids
        self.verify_keys = {d: identity_key(d).verify_key for d in ids}
        self.devices = {
            d: DeviceSession(
                self.config,
                d,
                identity_key(d),
                self.verify_keys,
                random_bytes=fixed_random(f"{self.seed}/{d}"),
            )
            for d in ids
        }
        self.aggregator = AggregatorSession(self.config, self.verify_keys)
        rng = np.random.default_rng(self.seed)
        quantiser = self.config.quantiser
        # Some updates longer than the clip bound, some shorter.
        self.updates = {d: rng.normal(0.0, 0.4, self.config.vector_length) for d in ids}
        self.quantised = {d: quantiser.quantise(self.updates[d], rng) for d in ids}

    def run(
        self,
        *,
        drop_before_advertise: Collection[str] = (),
        drop_before_sharing: Collection[str] = (),
        drop_before_input: Collection[str] = (),
        drop_before_unmask: Collection[str] = (),
        observe: Callable[[str], None] = lambda step: None,
        tamper: Callable[[m.ShareDelivery], m.ShareDelivery] = lambda delivery: delivery,
        wire: bool = True,
    ) -> SecAggResult:
        """One whole round; ``observe(step)`` runs after every aggregator step, ``tamper`` may
        change share deliveries on the way. With ``wire``, every message goes through its
        encoding and bounded decoding."""
        bundles = self.advertise(drop_before_advertise, observe, wire)
        deliveries = self.share(bundles, drop_before_sharing, observe, wire)
        requests = self.mask(deliveries, drop_before_input, observe, wire, tamper)
        self.unmask(requests, drop_before_unmask, observe, wire)
        result = self.aggregator.finish(T_UNMASK + 1)
        observe("finish")
        return result

    def advertise(
        self, drop: Collection[str] = (), observe: Callable[[str], None] = _ignore, wire: bool = True
    ) -> dict[str, m.AdvertisementBundle]:
        agg = self.aggregator
        for device_id, device in self.devices.items():
            if device_id in drop:
                continue
            ad = device.advertise(T_ADVERTISE)
            agg.on_advertisement(Advertisement.decode(ad.encode()) if wire else ad, T_ADVERTISE)
            observe("advertisement")
        bundles = agg.close_advertising(T_SHARE)
        observe("close_advertising")
        return bundles

    def share(
        self,
        bundles: dict[str, m.AdvertisementBundle],
        drop: Collection[str] = (),
        observe: Callable[[str], None] = _ignore,
        wire: bool = True,
    ) -> dict[str, m.ShareDelivery]:
        cfg, agg = self.config, self.aggregator
        for device_id, bundle in bundles.items():
            if device_id in drop:
                continue
            received = m.AdvertisementBundle.decode(bundle.encode(), cfg) if wire else bundle
            try:
                shares = self.devices[device_id].on_advertisements(received, T_SHARE)
            except SecAggError:
                continue  # the device left the round: a dropout like any other
            agg.on_shares(m.ShareMessage.decode(shares.encode(), cfg) if wire else shares, T_SHARE)
            observe("shares")
        deliveries = agg.close_sharing(T_INPUT)
        observe("close_sharing")
        return deliveries

    def mask(
        self,
        deliveries: dict[str, m.ShareDelivery],
        drop: Collection[str] = (),
        observe: Callable[[str], None] = _ignore,
        wire: bool = True,
        tamper: Callable[[m.ShareDelivery], m.ShareDelivery] = lambda delivery: delivery,
    ) -> dict[str, m.UnmaskRequest]:
        cfg, agg = self.config, self.aggregator
        for device_id, delivery in deliveries.items():
            if device_id in drop:
                continue
            received = tamper(m.ShareDelivery.decode(delivery.encode(), cfg) if wire else delivery)
            device = self.devices[device_id]
            try:
                device.on_shares(received, T_INPUT)
            except SecAggError:
                continue
            masked = device.mask(self.quantised[device_id], T_INPUT)
            agg.on_masked_input(
                m.MaskedInput.decode(masked.encode(cfg.bits), cfg) if wire else masked, T_INPUT
            )
            observe("masked_input")
        requests = agg.close_masked_input(T_UNMASK)
        observe("close_masked_input")
        return requests

    def unmask(
        self,
        requests: dict[str, m.UnmaskRequest],
        drop: Collection[str] = (),
        observe: Callable[[str], None] = _ignore,
        wire: bool = True,
    ) -> None:
        cfg, agg = self.config, self.aggregator
        for device_id, request in requests.items():
            if device_id in drop:
                continue
            received = m.UnmaskRequest.decode(request.encode(), cfg) if wire else request
            response = self.devices[device_id].on_unmask_request(received, T_UNMASK)
            agg.on_unmask_response(
                m.UnmaskResponse.decode(response.encode(), cfg) if wire else response, T_UNMASK
            )
            observe("unmask_response")

    def expected_total(self, survivors: Collection[str]) -> npt.NDArray[np.uint64]:
        total = np.zeros(self.config.vector_length, dtype=np.uint64)
        for device_id in survivors:
            total += self.quantised[device_id]
        mask: npt.NDArray[np.uint64] = total & np.uint64((1 << self.config.bits) - 1)
        return mask


def arrays_in(obj: object, seen: set[int] | None = None) -> list[npt.NDArray[np.generic]]:
    """Every numpy array reachable from ``obj``'s attributes, dicts, lists, tuples and sets."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    found: list[npt.NDArray[np.generic]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += arrays_in(key, seen) + arrays_in(value, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            found += arrays_in(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            found += arrays_in(value, seen)
    return found
