"""The aggregator's ``[upstream]`` table: a building gateway under a campus aggregator
(``fedge.aggregator.upstream``, docs/scale.md "Buildings under a campus")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.errors import FedgeError
from fedge.protocol.sealing import public_key_from_text
from fedge.protocol.signing import verify_key_from_text
from fedge.protocol.topics import TopicError, check_id

UPSTREAM_KEYS = {
    "enabled",
    "campus_fleet",
    "building_id",
    "campus_verify_keys",
    "campus_public_key",
    "key_file",
    "margin_s",
}


@dataclass(frozen=True)
class UpstreamSettings:
    enabled: bool = False
    #: The campus aggregator's fleet id (its topics come over the bridge: fedge/v1/{campus}/...).
    campus_fleet: str = ""
    #: This building's device id in the campus fleet (its campus registry entry).
    building_id: str = ""
    #: The campus aggregator's signing keys (``fedge keys show``), as a device pins them.
    campus_verify_keys: tuple[str, ...] = ()
    #: The campus aggregator's box public key, which the building seals to.
    campus_public_key: str = ""
    #: The building's own box private key for the campus (enrolled in the campus registry).
    key_file: Path = Path()
    #: The building's round closes this long before the campus round's deadline, so that its
    #: contribution crosses the bridge in time.
    margin_s: float = 2.0


UPSTREAM_OFF = UpstreamSettings()


def upstream_settings_from_table(t: Table, base: Path) -> UpstreamSettings:
    """Parses ``[upstream]``; every key given is checked even when it is off, so a typo does not
    wait for the day the building joins a campus."""
    enabled = t.flag("enabled", False)
    margin = t.number("margin_s", 2.0, 0.0, 3600.0)
    campus, building = t.opt_text("campus_fleet"), t.opt_text("building_id")
    public, key_file = t.opt_text("campus_public_key"), t.opt_text("key_file")
    keys = t.raw.get("campus_verify_keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise ConfigError(
            "[upstream] campus_verify_keys must be a non-empty list of the campus aggregator's signing "
            "keys (base64, as [agent] aggregator_verify_keys)"
        )
    try:
        for value, what in ((campus, "campus fleet id"), (building, "building id")):
            if value is not None:
                check_id(value, what)
        for key in keys or ():
            verify_key_from_text(key)
        if public is not None:
            public_key_from_text(public)
    except (TopicError, FedgeError) as exc:
        raise ConfigError(f"[upstream] {exc}") from None
    if not enabled:
        return UPSTREAM_OFF
    missing = [
        name
        for name, value in (
            ("campus_fleet", campus),
            ("building_id", building),
            ("campus_verify_keys", keys),
            ("campus_public_key", public),
            ("key_file", key_file),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"[upstream] enabled needs {', '.join(missing)} (docs/configuration.md)")
    assert campus and building and public and key_file and keys
    return UpstreamSettings(
        enabled=True,
        campus_fleet=campus,
        building_id=building,
        campus_verify_keys=tuple(keys),
        campus_public_key=public,
        key_file=base / key_file,
        margin_s=margin,
    )
