"""One device cannot burn the aggregator's CPU with its messages (issue 10, item 4), through the
generated TLS broker configuration and a real ``fedge aggregator run``.

The attacker is an enrolled device publishing, as itself, on its own ``update/{id}``: a message
one byte over the size limit the aggregator derives from the model, then twenty messages sealed
with its real key whose content is refused, then its genuine moments. Before, each of the twenty
cost a full decryption and the genuine message was still accepted afterwards (the limit was
16 MiB and a refused message did not use up the device's slot). Now: ``too_large`` without
parsing, one ``bad_schema``, and everything after it ``duplicate``, refused before any crypto;
the device is listed as ``refused`` in the round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.messages import encode_moments, max_sealed_bytes
from fedge.protocol.sealing import SealedHeader, seal
from support.fleet_harness import latest_status
from support.secure_fleet import SecureFleet

pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

ATTACKER = "watch-01"
FLOOD = 20


def test_a_flood_of_authentic_bad_messages_costs_one_decryption_and_spends_the_slot(
    tmp_path: Path, har_model_dir: Path
) -> None:
    # Deployment defaults; no agents run, so the moments round stays open for the attack.
    rounds = {"rounds": 1, "wait_for_devices_s": 0.0, "round_timeout_s": 300.0}
    with SecureFleet(tmp_path, har_model_dir, 2, rounds) as sf, sf.recorder("monitor") as rec:
        fleet = sf.fleet
        topics = fleet.topics
        proc = fleet.start_aggregator()
        (manifest,) = _wait(rec, sf, lambda: fleet.manifests(rec), "the moments round's manifest")
        assert manifest.phase == "moments"
        key = fleet.files.device_keys[ATTACKER]
        aggregator = fleet.files.box_key.public_key
        features = manifest.model_manifest.task.input_dim
        limit = max_sealed_bytes(manifest.model_manifest.layout, manifest.codec, features)

        def sealed(counter: int, header: dict[str, Any], body: bytes) -> bytes:
            h = SealedHeader(topics.fleet, ATTACKER, manifest.round_id, counter, "moments", manifest.version)
            return seal(h, header, body, key, aggregator)

        oversized = sealed(1, {"count": 10, "features": features}, bytes(limit))
        assert len(oversized) > limit
        bad = [sealed(2 + i, {"count": "many"}, bytes(limit - 2048)) for i in range(FLOOD)]
        x = np.random.default_rng(0).normal(size=(50, features))
        genuine = sealed(100, *encode_moments(50, x.sum(axis=0), (x * x).sum(axis=0)))
        for payload in (oversized, *bad, genuine):
            assert not sf.publish(ATTACKER, topics.update(ATTACKER), payload).is_failure

        want = {"too_large": 1, "bad_schema": 1, "duplicate": FLOOD}

        def counted() -> dict[str, Any] | None:
            status = latest_status(rec.messages, topics.aggregator_status)
            return status if status.get("rejected_total") == want else None

        status = _wait(rec, sf, counted, "the flood counted")
        assert status["refused"] == [ATTACKER] and status["reported"] == []
        assert status["limits"]["max_message_bytes"] == limit
        assert proc.poll() is None  # still running, the round still open for the honest device
        log = fleet.log("aggregator")
        assert log.count("bad_schema") == 1 and "accepted moments from watch-01" not in log


def _wait(rec: Any, sf: SecureFleet, value: Any, what: str) -> Any:
    """The first truthy ``value()``, checked after every message the monitor records (bounded)."""
    rec.wait_for(lambda _ms: bool(value()), 60, what)
    return value()
