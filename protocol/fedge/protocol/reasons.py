"""Why a message from a device is refused: every rejection reason, in one enum.

The aggregator counts refused messages by reason (``rejected_total`` in ``aggregator/status``
and in its checkpoint), logs them and tests assert them, so the codes are part of the contract
and must not drift between the modules that raise them (framing, sealing, messages, the round
engine). Members are ``str``: they compare equal to, hash like and serialise as their codes,
so JSON documents and comparisons with plain strings see no difference.

Members are listed in the order the aggregator checks a message (docs/protocol.md, "Rejection
reasons"; a test keeps the two in step). Frame reasons (:data:`FRAME_REASONS`, what
:class:`fedge.protocol.framing.FrameError` carries) reach a count only with a prefix saying
which frame was bad: :data:`FRAME_PREFIX` for a message's own frame, :data:`PAYLOAD_PREFIX`
for the payload frame inside a sealed box (``frame_bad_magic``, ``payload_truncated``).
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """A short, stable code for why a message was refused."""

    #: Bigger than the receiver's limit (``max_update_bytes``); refused before it is parsed.
    TOO_LARGE = "too_large"
    #: Arrived on a topic that is not ``update/{device_id}`` of this fleet.
    BAD_TOPIC = "bad_topic"
    #: Frame: the magic bytes are not ``FEDG``.
    BAD_MAGIC = "bad_magic"
    #: Frame: a frame format version this fedge does not read.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: Frame: the reserved bytes are not zero.
    BAD_RESERVED = "bad_reserved"
    #: Frame: the JSON header is (or declares itself) over ``MAX_HEADER_BYTES``.
    HEADER_TOO_LARGE = "header_too_large"
    #: Frame: the body declares more bytes than the receiver's limit.
    BODY_TOO_LARGE = "body_too_large"
    #: Frame: the declared lengths do not add up to the bytes received.
    LENGTH_MISMATCH = "length_mismatch"
    #: A frame header that is not a UTF-8 JSON object, or a sealed header off its schema.
    BAD_HEADER = "bad_header"
    #: Shorter than a frame prefix, or a sealed body shorter than nonce + MAC.
    TRUNCATED = "truncated"
    #: The sealed header names another device than the topic does.
    DEVICE_MISMATCH = "device_mismatch"
    #: The sealed header names another fleet.
    WRONG_FLEET = "wrong_fleet"
    #: The device is not enrolled.
    UNKNOWN_DEVICE = "unknown_device"
    #: The device was enrolled and has been revoked.
    REVOKED_DEVICE = "revoked_device"
    #: No round is open (between rounds, or training is over).
    NO_OPEN_ROUND = "no_open_round"
    #: ``[rounds] aggregation = "async"``: trained from a version older than ``max_staleness``.
    STALE = "stale"
    #: The message names another round than the open one.
    WRONG_ROUND = "wrong_round"
    #: Arrived after the round's deadline.
    LATE = "late"
    #: Trained on another model version than the open round's.
    WRONG_VERSION = "wrong_version"
    #: The device is not selected for the open round.
    NOT_SELECTED = "not_selected"
    #: A message kind the round's phase does not take; in a frame, a frame of another kind.
    WRONG_KIND = "wrong_kind"
    #: A second message from a device in a round, after one that opened with its key.
    DUPLICATE = "duplicate"
    #: A counter at or below the newest one accepted from the device (a replay).
    REPLAYED_COUNTER = "replayed_counter"
    #: The device's enrolled public key cannot make a shared key (malformed or low-order).
    BAD_KEY = "bad_key"
    #: Not sealed by the claimed device for this aggregator, or altered on the way.
    DECRYPT_FAILED = "decrypt_failed"
    #: The header inside the box differs from the cleartext header.
    BINDING_MISMATCH = "binding_mismatch"
    #: The decrypted payload header is not ``{"bind": ..., "payload": {...}}``.
    BAD_PAYLOAD = "bad_payload"
    #: A payload header with missing, extra or mistyped fields.
    BAD_SCHEMA = "bad_schema"
    #: An update encoded with another codec than the round asked for.
    WRONG_CODEC = "wrong_codec"
    #: An example or sample count that is not an integer in 1..2^31-1.
    BAD_COUNT = "bad_count"
    #: Update tensor bytes that do not match the layout and codec, or decode to non-finite values.
    BAD_TENSOR = "bad_tensor"
    #: A loss, metric or moment that is NaN or infinite.
    NOT_FINITE = "not_finite"
    #: Moments for another number of features than the task has.
    BAD_SHAPE = "bad_shape"
    #: Claims more examples than ``max_examples_per_update`` allows.
    TOO_MANY_EXAMPLES = "too_many_examples"
    #: Moments no real data can have (a negative sum of squares or variance), or that overflow.
    BAD_MOMENTS = "bad_moments"
    #: The update's norm is over the bound, with ``update_norm_policy = "reject"``.
    NORM_TOO_LARGE = "norm_too_large"
    #: A robust strategy (median, trimmed mean, Krum) already holds ``robust_max_updates``
    #: updates this round: the update is refused rather than held.
    TOO_MANY_UPDATES = "too_many_updates"
    #: The aggregation refused the update (e.g. adding it would overflow the weighted sum).
    REJECTED_BY_AGGREGATION = "rejected_by_aggregation"


#: The reasons a frame can be refused with (:class:`fedge.protocol.framing.FrameError`), in the
#: order :func:`fedge.protocol.framing.decode_frame` checks them.
FRAME_REASONS: tuple[RejectReason, ...] = (
    RejectReason.TRUNCATED,
    RejectReason.BAD_MAGIC,
    RejectReason.UNSUPPORTED_VERSION,
    RejectReason.WRONG_KIND,
    RejectReason.BAD_RESERVED,
    RejectReason.HEADER_TOO_LARGE,
    RejectReason.BODY_TOO_LARGE,
    RejectReason.LENGTH_MISMATCH,
    RejectReason.BAD_HEADER,
)

#: Prefix of a frame reason when a message's (or signed document's) own frame is bad.
FRAME_PREFIX = "frame_"
#: Prefix of a frame reason when the payload frame inside a sealed box is bad.
PAYLOAD_PREFIX = "payload_"
