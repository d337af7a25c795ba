"""The MQTT topic tree under ``fedge/v1/{fleet}/`` (documented in ``docs/protocol.md``).

Device and fleet ids are restricted to characters that cannot form MQTT wildcards or extra
levels, so a topic names exactly one device and a device id taken from a topic can be
compared with the id inside a sealed message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import FedgeError

ROOT = "fedge/v1"
#: What a secure-aggregation round publishes once for the whole fleet (``secagg/{round}/{what}``).
SECAGG_ROUND_TOPICS = ("config",)
#: What it publishes to each device (``secagg/{round}/{what}/{device}``), in phase order.
SECAGG_DEVICE_TOPICS = ("bundle", "delivery", "unmask")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class TopicError(FedgeError):
    """A topic or an id in it is malformed."""


def check_id(value: str, what: str = "device id") -> str:
    """Returns ``value`` if it is a valid fleet or device id (1-64 of ``A-Z a-z 0-9 _ . -``)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class FleetTopics:
    """All topics of one fleet. Retained: manifest, blobs, statuses, secure-aggregation documents."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet id")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.fleet}"

    # aggregator -> devices
    @property
    def manifest(self) -> str:
        """Retained, signed manifest of the current global model and round."""
        return f"{self.base}/manifest"

    def blob(self, sha256: str) -> str:
        """Retained blob (model or weights) named by its SHA-256, as the manifest lists it."""
        if not is_sha256_hex(sha256):
            raise TopicError(f"invalid blob hash {sha256!r}")
        return f"{self.base}/blob/{sha256}"

    @property
    def blob_filter(self) -> str:
        return f"{self.base}/blob/+"

    def blob_chunk(self, sha256: str, index: int) -> str:
        """Retained piece ``index`` of a blob over ``chunk_bytes`` (``fedge.protocol.chunks``)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1_000_000:
            raise TopicError(f"invalid blob piece index {index!r}")
        return f"{self.blob(sha256)}/{index:06d}"

    def blob_chunk_filter(self, sha256: str) -> str:
        """Every piece of one blob."""
        return f"{self.blob(sha256)}/+"

    def blob_chunk_parse(self, topic: str) -> tuple[str, int]:
        """``(sha256, index)`` of a blob piece's topic; raises :class:`TopicError` on any other."""
        prefix = f"{self.base}/blob/"
        parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
        if len(parts) != 2 or not is_sha256_hex(parts[0]) or not (len(parts[1]) == 6 and parts[1].isdigit()):
            raise TopicError(f"topic {topic!r} is not a blob piece of fleet {self.fleet!r}")
        return parts[0], int(parts[1])

    def rotation(self, sequence: int) -> str:
        """Retained signing-key rotation documents, one per sequence number (devices that missed
        several apply them in order)."""
        if isinstance(sequence, bool) or not isinstance(sequence, int) or not 1 <= sequence < 10**9:
            raise TopicError(f"invalid rotation sequence {sequence!r}")
        return f"{self.base}/keys/rotation/{sequence:06d}"

    @property
    def rotation_filter(self) -> str:
        return f"{self.base}/keys/rotation/+"

    @property
    def rollout(self) -> str:
        """Retained, signed: the newest ``promote`` or ``rollback`` of the rollout gate, the model
        devices predict with (``fedge.protocol.rollout``, docs/rollout.md)."""
        return f"{self.base}/rollout"

    @property
    def rollout_decision(self) -> str:
        """Retained, signed: the rollout gate's newest decision of any kind (refusals too)."""
        return f"{self.base}/rollout/decision"

    @property
    def aggregator_status(self) -> str:
        """Retained JSON status of the aggregator: round, version, rejected updates by reason."""
        return f"{self.base}/aggregator/status"

    # aggregator replicas ([replicas]: docs/scale.md)
    @property
    def work(self) -> str:
        """Retained, signed: the open round and its limits, as every aggregator worker folds it."""
        return f"{self.base}/aggregator/work"

    def partial(self, worker: str) -> str:
        """A worker's sealed partial aggregate, to the leader."""
        return f"{self.base}/aggregator/partial/{check_id(worker, 'worker id')}"

    @property
    def partial_filter(self) -> str:
        return f"{self.base}/aggregator/partial/+"

    def verdict(self, worker: str) -> str:
        """The leader's signed answer to a worker's partial."""
        return f"{self.base}/aggregator/verdict/{check_id(worker, 'worker id')}"

    def shared_update_filter(self, group: str) -> str:
        """``update/+`` through an MQTT shared subscription: the broker hands each update to one
        member of ``group`` (the leader and its workers)."""
        return f"$share/{check_id(group, 'share group')}/{self.update_filter}"

    @property
    def fleet_summary(self) -> str:
        """Retained JSON summary of the fleet for building-management systems (``fedge.fleet/1``):
        devices online, stale, offline, not ready; model version; last round; rejections."""
        return f"{self.base}/aggregator/fleet"

    # secure aggregation, aggregator -> devices (fedge.protocol.secagg.wire)
    def secagg(self, round_id: str, what: str) -> str:
        """Retained, signed document of a secure-aggregation round for every device: its
        ``config``. Per round, so a device that reconnects mid-round finds it, and a new round
        never overwrites a round still running; cleared (empty retained payload) when it ends."""
        if what not in SECAGG_ROUND_TOPICS:
            raise TopicError(f"invalid secagg round topic {what!r}: one of {SECAGG_ROUND_TOPICS}")
        return f"{self.base}/secagg/{check_id(round_id, 'round id')}/{what}"

    def secagg_device(self, round_id: str, device_id: str, what: str) -> str:
        """Retained, signed document of a secure-aggregation round for one device: its
        ``bundle`` (neighbours' advertisements), ``delivery`` (shares addressed to it) or
        ``unmask`` request; one topic each, so a later phase never replaces an earlier one."""
        if what not in SECAGG_DEVICE_TOPICS:
            raise TopicError(f"invalid secagg device topic {what!r}: one of {SECAGG_DEVICE_TOPICS}")
        return f"{self.base}/secagg/{check_id(round_id, 'round id')}/{what}/{check_id(device_id)}"

    @property
    def secagg_config_filter(self) -> str:
        """Every round's config: how a device learns that a secure-aggregation round started."""
        return f"{self.base}/secagg/+/config"

    def secagg_device_filter(self, round_id: str, device_id: str) -> str:
        """Everything one round sends one device (bundle, delivery, unmask)."""
        return f"{self.base}/secagg/{check_id(round_id, 'round id')}/+/{check_id(device_id)}"

    def secagg_round_filter(self, round_id: str) -> str:
        """Everything one round publishes (to find and clear its retained documents)."""
        return f"{self.base}/secagg/{check_id(round_id, 'round id')}/#"

    def secagg_parse(self, topic: str) -> tuple[str, str, str | None]:
        """``(round_id, what, device_id or None)`` of a secure-aggregation topic of this fleet;
        raises :class:`TopicError` on any other topic (ids checked like everywhere else)."""
        prefix = f"{self.base}/secagg/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not a secagg topic of fleet {self.fleet!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] in SECAGG_ROUND_TOPICS:
            return check_id(parts[0], "round id"), parts[1], None
        if len(parts) == 3 and parts[1] in SECAGG_DEVICE_TOPICS:
            return check_id(parts[0], "round id"), parts[1], check_id(parts[2])
        raise TopicError(f"topic {topic!r} is not a secagg topic of fleet {self.fleet!r}")

    # devices -> aggregator
    def update(self, device_id: str) -> str:
        """Sealed messages from one device: model updates, feature moments, secure-aggregation
        messages (QoS 1)."""
        return f"{self.base}/update/{check_id(device_id)}"

    @property
    def update_filter(self) -> str:
        return f"{self.base}/update/+"

    def status(self, device_id: str) -> str:
        """Retained JSON status of one device; its MQTT Last Will marks it offline."""
        return f"{self.base}/status/{check_id(device_id)}"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/status/+"

    def insight(self, device_id: str) -> str:
        """Retained JSON prediction of one device (``fedge.insight/1``, QoS 1): the verified
        global model run on the device's newest live window, for building-management systems."""
        return f"{self.base}/insight/{check_id(device_id)}"

    def identity(self, device_id: str) -> str:
        """Retained identity certificate of one device (``fedge.protocol.identity``), published by
        the device itself: the operator-signed key its secure-aggregation round keys are signed
        with. Read by every device (its neighbours) and the aggregator; only a pinned operator
        key makes one count, so neither the broker nor the aggregator can forge it."""
        return f"{self.base}/identity/{check_id(device_id)}"

    @property
    def identity_filter(self) -> str:
        return f"{self.base}/identity/+"

    @property
    def insight_filter(self) -> str:
        return f"{self.base}/insight/+"

    def device_of(self, topic: str, kind: str) -> str:
        """The device id in ``{base}/{kind}/{device}``; raises on any other topic."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not a {kind} topic of fleet {self.fleet!r}")
        return check_id(topic[len(prefix) :])
