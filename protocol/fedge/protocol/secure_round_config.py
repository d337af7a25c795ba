"""A secure round's :class:`~fedge.protocol.secagg.config.RoundConfig`, derived from its signed
manifest, so that the aggregator cannot choose anything the manifest does not already fix.

Both sides call :func:`round_config_for`: the aggregator to build the config it announces, each
device to check that the config document it receives (``secagg/{round}/config``) is exactly this
one, and to refuse the round otherwise (``fedge.agent.secure_round``).

- **Devices**: the manifest's ``selected_devices``, sorted.
- **Vector**: the model's parameters (``parameter_count``): the device's clipped, quantised delta.
- **Clip bound, modulus, degree, threshold**: ``manifest.secure_aggregation``.
- **Deadlines**: fixed fractions (:data:`PHASE_FRACTIONS`) of the time between the manifest's
  ``issued_at`` and its ``deadline``: advertising, sharing, masked input, unmasking. Training
  happens before the device advertises, so the first phase leaves the most room.
- **Graph seed**: SHA-256 of a domain tag, the previous manifest's hash (``parent_sha256``), the
  round id and the selected devices. The aggregator does not pick it, so it cannot try seeds
  until a target device is surrounded by devices it controls; to get another seed it would
  have to publish another manifest, which every device sees (and a round aborted for that costs
  it the round). Not a proof against a patient malicious aggregator that aborts rounds on
  purpose (``docs/secure-aggregation.md``).

Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.secagg.config import Deadlines, RoundConfig

#: Each phase's deadline, as a fraction of the round (from ``issued_at`` to ``deadline``).
PHASE_FRACTIONS: Final = (0.4, 0.55, 0.85, 1.0)
_SEED_TAG: Final = b"fedge-secagg-graph-seed-v1\x00"


def graph_seed_for(parent_sha256: str, round_id: str, selected: Sequence[str]) -> bytes:
    """The round's public neighbour-graph seed (module docstring: why these inputs)."""
    h = hashlib.sha256(_SEED_TAG)
    for part in (parent_sha256, round_id, *sorted(selected)):
        data = part.encode()
        h.update(len(data).to_bytes(4, "big") + data)
    return h.digest()


def deadlines_for(issued_at: float, deadline: float) -> Deadlines:
    """The four phase deadlines of a round that runs from ``issued_at`` to ``deadline``."""
    span = deadline - issued_at
    advertise, share, masked_input = (issued_at + span * f for f in PHASE_FRACTIONS[:3])
    return Deadlines(advertise, share, masked_input, deadline)


def round_config_for(manifest: RoundManifest) -> RoundConfig:
    """The secure round's config; ``FedgeError`` for a manifest that announces none. A
    ``SecAggError`` (``bad_parameters``) if the announced parameters do not fit the selection
    (a degree or threshold the protocol does not allow for that many devices)."""
    announced = manifest.secure_aggregation
    if announced is None or manifest.phase != "train":
        raise FedgeError(f"manifest v{manifest.version} announces no secure-aggregation round")
    return RoundConfig(
        round_id=manifest.round_id,
        device_ids=tuple(sorted(manifest.selected_devices)),
        graph_seed=graph_seed_for(manifest.parent_sha256, manifest.round_id, manifest.selected_devices),
        degree=announced.degree,
        threshold=announced.threshold,
        vector_length=manifest.model_manifest.parameter_count,
        bits=announced.bits,
        clip_norm=announced.clip_norm,
        deadlines=deadlines_for(manifest.issued_at, manifest.deadline),
    )
