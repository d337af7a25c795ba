"""Why a secure-aggregation message or request is refused: one closed set of stable codes.

Both state machines (:mod:`.device` and :mod:`.aggregator`) count every refusal by reason, and
the later MQTT integration reports the counts the way the rest of fedge does (``messages_dropped``
by reason). The device-side refusals of an unmask request are the protocol's security properties,
so each has its own code: a test, a log line or an alert can tell a malicious aggregator's
request (``alive_and_dropped``, ``too_few_alive``, ``outside_neighbourhood``,
``both_shares_requested``) from a lost or garbled message.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from fedge.protocol.errors import ReasonFieldError


class SecAggReason(StrEnum):
    """A short, stable code for why a secure-aggregation step refused its input."""

    # --- parsing (either side) ------------------------------------------------------------
    #: More bytes, ids, shares or coordinates than the round allows; refused before parsing.
    TOO_LARGE = "too_large"
    #: Not the JSON object the message type defines (missing, extra or mistyped fields).
    BAD_MESSAGE = "bad_message"
    #: A masked vector of the wrong length, or with values outside ``0 .. 2**bits - 1``.
    BAD_VECTOR = "bad_vector"
    #: A Shamir share that is malformed, outside the field, or at another holder's x.
    BAD_SHARE = "bad_share"
    #: A public key that is not 32 bytes, or a low-order X25519 point (no shared secret).
    BAD_KEY = "bad_key"
    #: Round parameters outside what the protocol allows (threshold, degree, bits, ...).
    BAD_PARAMETERS = "bad_parameters"

    # --- where and when ---------------------------------------------------------------------
    #: The message names another round.
    WRONG_ROUND = "wrong_round"
    #: The message does not fit the state machine's current phase.
    WRONG_PHASE = "wrong_phase"
    #: Arrived after the round's last deadline.
    EXPIRED = "expired"
    #: A device id that is not selected for the round, or has no enrolled identity key.
    UNKNOWN_DEVICE = "unknown_device"
    #: A device that is not in the sender's or the receiver's neighbourhood.
    NOT_NEIGHBOUR = "not_neighbour"
    #: A second message of a kind a device sends once per round.
    DUPLICATE = "duplicate"

    # --- advertisements -------------------------------------------------------------------
    #: The advertisement's Ed25519 signature does not verify with the device's enrolled key.
    BAD_SIGNATURE = "bad_signature"
    #: A second, different advertisement for a device id already accepted this round.
    SUBSTITUTED_KEYS = "substituted_keys"
    #: A public key that another device (or the same device's other key) already advertised.
    KEY_REUSED = "key_reused"
    #: Fewer than ``threshold`` usable neighbours: the device could not be recovered, so it stops.
    TOO_FEW_NEIGHBOURS = "too_few_neighbours"

    # --- encrypted shares -----------------------------------------------------------------
    #: A share ciphertext that does not open with the sender's advertised share key.
    DECRYPT_FAILED = "decrypt_failed"
    #: A share ciphertext whose inner round, sender or recipient differ from the outer ones.
    BINDING_MISMATCH = "binding_mismatch"

    # --- unmask requests (device side: the security properties) -------------------------------
    #: The request names a device as both alive and dropped.
    ALIVE_AND_DROPPED = "alive_and_dropped"
    #: The request names fewer than ``threshold`` alive neighbours.
    TOO_FEW_ALIVE = "too_few_alive"
    #: The request asks for a share of a device the receiver holds none of (outside its
    #: neighbourhood, itself, or a neighbour it did not exchange shares with).
    OUTSIDE_NEIGHBOURHOOD = "outside_neighbourhood"
    #: The request asks for the other kind of share of a device than the one already revealed.
    BOTH_SHARES_REQUESTED = "both_shares_requested"

    # --- aggregator: why a round cannot finish --------------------------------------------
    #: Fewer than ``threshold`` devices (or neighbours of one device) are left.
    TOO_FEW_SURVIVORS = "too_few_survivors"
    #: Fewer than ``threshold`` shares arrived to rebuild one device's secret.
    TOO_FEW_SHARES = "too_few_shares"
    #: The shares of one secret do not lie on one polynomial (a device sent a wrong share).
    INCONSISTENT_SHARES = "inconsistent_shares"
    #: A rebuilt mask key does not match the public key the device advertised.
    KEY_MISMATCH = "key_mismatch"
    #: Two surviving devices disagree on whether they masked with each other.
    ASYMMETRIC_MASKS = "asymmetric_masks"


class SecAggError(ReasonFieldError[SecAggReason]):
    """A secure-aggregation input is refused; ``reason`` is a :class:`SecAggReason`.

    A refusal never changes the refusing state machine's state except for its refusal count
    (and, where the docstring of the step says so, ending the round for that party).
    """


class RoundAborted(SecAggError):
    """The round cannot produce a sum (too few survivors or shares, or inconsistent shares).

    Nothing about any individual input is revealed by an abort; the caller starts a new round.
    """


def refusal(
    reason: SecAggReason, detail: str, *, field: str | None = None, expected: Any = None, found: Any = None
) -> SecAggError:
    """A :class:`SecAggError`, with the field attributes where the check knows them."""
    return SecAggError(reason, detail, field=field, expected=expected, found=found)
