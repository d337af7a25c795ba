"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017): the pure core.

The aggregator learns the sum of the surviving devices' (clipped, quantised) updates and
nothing else about any one of them, even if it deviates from the protocol, as long as fewer
than ``2t - k`` of any device's k neighbours collude with it (``docs/secure-aggregation.md``).

One module per job:

- :mod:`.config`: the round's public parameters (:class:`RoundConfig`), what all parties agree on;
- :mod:`.params`: choosing the graph degree k and threshold t from the fleet size;
- :mod:`.graph`: the neighbour graph, random k-regular from a public seed, or complete;
- :mod:`.quantise`: clip, quantise with headroom, dequantise the sum;
- :mod:`.prg`: key agreement, domain-separated seeds, ChaCha20 mask expansion;
- :mod:`.shamir`: t-of-n sharing of 32-byte secrets over GF(2**521 - 1);
- :mod:`.advertisement`: per-round keys, signed with the device's Ed25519 identity key;
- :mod:`.share_box`: shares encrypted device to device, relayed by the aggregator;
- :mod:`.messages`: the wire messages, bounded parsing, canonical JSON;
- :mod:`.device` and :mod:`.aggregator`: the two sans-I/O state machines;
- :mod:`.errors`: :class:`SecAggError` and its reasons.

Pure like the rest of :mod:`fedge.protocol`: no I/O and no clock (time is passed in); the only
randomness is libsodium's, and every function that draws some takes a ``random_bytes``
callable (and quantisation a ``numpy.random.Generator``) so tests can fix it.
"""

from fedge.protocol.secagg.advertisement import (
    Advertisement,
    RoundKeys,
    sign_advertisement,
    verify_advertisement,
)
from fedge.protocol.secagg.aggregator import AggregatorPhase, AggregatorSession, SecAggResult
from fedge.protocol.secagg.config import Deadlines, RoundConfig, new_round_config
from fedge.protocol.secagg.device import DevicePhase, DeviceSession, ShareKind
from fedge.protocol.secagg.errors import RoundAborted, SecAggError, SecAggReason
from fedge.protocol.secagg.messages import (
    AdvertisementBundle,
    MaskedInput,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedge.protocol.secagg.params import SecAggParams, choose_parameters
from fedge.protocol.secagg.quantise import Quantiser, clip_to_norm

__all__ = [
    "Advertisement",
    "AdvertisementBundle",
    "AggregatorPhase",
    "AggregatorSession",
    "Deadlines",
    "DevicePhase",
    "DeviceSession",
    "MaskedInput",
    "Quantiser",
    "RoundAborted",
    "RoundConfig",
    "RoundKeys",
    "SecAggError",
    "SecAggParams",
    "SecAggReason",
    "SecAggResult",
    "ShareDelivery",
    "ShareKind",
    "ShareMessage",
    "UnmaskRequest",
    "UnmaskResponse",
    "choose_parameters",
    "clip_to_norm",
    "new_round_config",
    "sign_advertisement",
    "verify_advertisement",
]
