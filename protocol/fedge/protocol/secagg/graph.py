"""Who shares with whom: a random k-regular (Harary) graph from a public seed, or the complete graph.

Why a sparse graph: with every device sharing with every other (Bonawitz et al. 2017), each
device does O(n) key agreements, PRG expansions and share encryptions, and the aggregator
O(n**2) reconstructions work: fine for ten devices, not for thousands. Bell et al. (2020)
show that a random graph of degree k = O(log n) keeps the same guarantee with high
probability (see :mod:`.params` for how k and the threshold are chosen).

Why this graph: the *random Harary graph* of Bell et al. -- put the devices on a ring in a
random order and join each to the ``k / 2`` nearest on either side. Every device has exactly k
neighbours (k even), the graph is connected, and which devices are neighbours is as
unpredictable as the order. The order is a Fisher-Yates shuffle of the sorted ids driven by
ChaCha20 keyed with ``BLAKE2b(seed)``, so every party that knows the round's public seed and
device list computes the same graph, without a message to agree on it. (The shuffle reduces
64-bit words modulo ``i + 1``; the bias, under ``n / 2**64``, is irrelevant for a public,
non-secret permutation.)

When ``k >= n - 1`` the graph is complete (every pair shares), which is what small fleets use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from nacl.utils import randombytes_deterministic

from fedge.protocol.secagg.errors import SecAggReason, refusal

SEED_BYTES = 32
_GRAPH_DOMAIN = b"fedge-sa-graph1"


def ring_order(device_ids: Sequence[str], seed: bytes) -> list[str]:
    """The devices in the ring order the public ``seed`` determines (same for every party)."""
    if len(seed) != SEED_BYTES:
        raise refusal(SecAggReason.BAD_PARAMETERS, "the graph seed is 32 bytes", found=len(seed))
    order = sorted(device_ids)
    key = hashlib.blake2b(seed, digest_size=32, person=_GRAPH_DOMAIN).digest()
    words = np.frombuffer(randombytes_deterministic(8 * max(len(order), 1), key), dtype="<u8")
    for i in range(len(order) - 1, 0, -1):
        j = int(words[i]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def is_complete(n: int, degree: int) -> bool:
    return degree >= n - 1


def check_degree(n: int, degree: int) -> None:
    """A degree the construction supports: ``n - 1`` (complete), or even and in ``2 .. n - 2``."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree > n - 1:
        raise refusal(
            SecAggReason.BAD_PARAMETERS,
            f"degree must be in 2..{n - 1} for {n} devices",
            field="degree",
            found=degree,
        )
    if not is_complete(n, degree) and degree % 2:
        raise refusal(
            SecAggReason.BAD_PARAMETERS,
            "a sparse (Harary) graph needs an even degree",
            field="degree",
            found=degree,
        )


def neighbours_at(order: Sequence[str], position: int, degree: int) -> frozenset[str]:
    """The neighbours of the device at ``position`` of the ring."""
    n = len(order)
    check_degree(n, degree)
    if is_complete(n, degree):
        return frozenset(order[:position]) | frozenset(order[position + 1 :])
    half = degree // 2
    return frozenset(order[(position + step) % n] for step in range(-half, half + 1) if step)


def neighbourhoods(device_ids: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Every device's neighbours (the aggregator needs them all; a device needs its own)."""
    order = ring_order(device_ids, seed)
    return {device: neighbours_at(order, i, degree) for i, device in enumerate(order)}
