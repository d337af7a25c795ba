"""SHA-256 digests as fedge writes them in documents and topics: 64 lowercase hex digits.

Manifests, blob topics and the device's trust store name models, weights and earlier documents
by their hash; every reader checks those names with the one rule here, so no part accepts an
upper-case or shortened hash that another refuses.
"""

from __future__ import annotations

import re
from typing import TypeGuard

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string of exactly 64 lowercase hex digits (a SHA-256 as fedge
    writes it); anything else, a non-string included, is not."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None
