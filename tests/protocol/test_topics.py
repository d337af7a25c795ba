"""MQTT topics: ids that cannot form wildcards or extra levels, every topic string, and parsing.

A device id taken from a topic is compared with the id inside a sealed message, so a topic must
name exactly one device and anything else must be a :class:`TopicError`.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedge.protocol.errors import FedgeError
from fedge.protocol.topics import ROOT, FleetTopics, TopicError, check_id

FLEET = FleetTopics("fleet-1")
SHA = "0123456789abcdef" * 4
ID_HINT = "use 1-64 letters, digits, '_', '.', '-'"


# --- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "A", "0", "watch-01", "dev_1.b-2", "x" * 64, "9" + "_.-" * 21],
    ids=["one letter", "upper", "digit", "typical", "all punctuation", "64 chars", "punctuation tail"],
)
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert check_id(value) is value
    assert check_id(value, "fleet id") is value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 65,
        "a/b",
        "/",
        "dev+",
        "+",
        "#",
        "dev#",
        "dev\n",
        "\ndev",
        "dev ",
        " dev",
        "_dev",
        ".dev",
        "-dev",
        "..",
        "dév",
        "dev٣",  # an Arabic-Indic digit: \d would accept it, the id alphabet must not
        "de\x00v",
        "dev\\x",
    ],
    ids=[
        "empty",
        "65 chars",
        "slash",
        "only slash",
        "plus",
        "only plus",
        "hash",
        "trailing hash",
        "trailing newline",
        "leading newline",
        "trailing space",
        "leading space",
        "leading underscore",
        "leading dot",
        "leading dash",
        "dot dot",
        "non-ascii letter",
        "non-ascii digit",
        "nul",
        "backslash",
    ],
)
def test_invalid_ids_are_refused_with_the_value_and_the_rule(value: str) -> None:
    with pytest.raises(TopicError) as exc:
        check_id(value)
    assert str(exc.value) == f"invalid device id {value!r}: {ID_HINT}"


@pytest.mark.parametrize("value", [None, 5, 1.5, b"dev", ["dev"], True], ids=repr)
def test_non_string_ids_are_a_topic_error_not_a_type_error(value: Any) -> None:
    with pytest.raises(TopicError) as exc:
        check_id(value, "fleet id")
    assert str(exc.value) == f"invalid fleet id {value!r}: {ID_HINT}"


def test_the_id_kind_is_named_in_the_message() -> None:
    with pytest.raises(TopicError, match=r"^invalid round id 'r/1': "):
        check_id("r/1", "round id")


def test_topic_error_is_a_fedge_error() -> None:
    assert issubclass(TopicError, FedgeError)


@pytest.mark.parametrize("fleet", ["", "a/b", "+", "#", "f\n", "x" * 65, None])
def test_fleet_topics_refuse_an_invalid_fleet_id(fleet: Any) -> None:
    with pytest.raises(TopicError) as exc:
        FleetTopics(fleet)
    assert str(exc.value) == f"invalid fleet id {fleet!r}: {ID_HINT}"


# --- topic strings ----------------------------------------------------------------------------


def test_every_topic_string_of_a_fleet() -> None:
    assert ROOT == "fedge/v1"
    assert FLEET.base == "fedge/v1/fleet-1"
    assert FLEET.manifest == "fedge/v1/fleet-1/manifest"
    assert FLEET.blob(SHA) == f"fedge/v1/fleet-1/blob/{SHA}"
    assert FLEET.blob_filter == "fedge/v1/fleet-1/blob/+"
    assert FLEET.aggregator_status == "fedge/v1/fleet-1/aggregator/status"
    assert FLEET.update("watch-01") == "fedge/v1/fleet-1/update/watch-01"
    assert FLEET.update_filter == "fedge/v1/fleet-1/update/+"
    assert FLEET.status("watch-01") == "fedge/v1/fleet-1/status/watch-01"
    assert FLEET.status_filter == "fedge/v1/fleet-1/status/+"


def test_topics_of_two_fleets_never_share_a_prefix_level() -> None:
    other = FleetTopics("fleet-10")
    assert not other.update("d").startswith(FLEET.base + "/")
    assert other.manifest != FLEET.manifest


@pytest.mark.parametrize("method", ["update", "status"])
@pytest.mark.parametrize("device", ["a/b", "+", "#", "", "d\n", "x" * 65])
def test_device_topics_refuse_an_invalid_device_id(method: str, device: str) -> None:
    with pytest.raises(TopicError) as exc:
        getattr(FLEET, method)(device)
    assert str(exc.value) == f"invalid device id {device!r}: {ID_HINT}"


@pytest.mark.parametrize(
    "sha",
    ["AB" * 32, SHA[:-1], SHA + "0", SHA + "\n", "g" * 64, "", "+", "#", SHA[:32] + "/" + SHA[33:]],
    ids=[
        "uppercase",
        "63 digits",
        "65 digits",
        "trailing newline",
        "not hex",
        "empty",
        "plus",
        "hash",
        "slash",
    ],
)
def test_blob_refuses_anything_but_64_lowercase_hex_digits(sha: str) -> None:
    with pytest.raises(TopicError) as exc:
        FLEET.blob(sha)
    assert str(exc.value) == f"invalid blob hash {sha!r}"


@pytest.mark.parametrize("sha", [None, 123, b"ab" * 32], ids=["none", "int", "bytes"])
def test_blob_refuses_a_non_string_hash_with_a_topic_error(sha: Any) -> None:
    with pytest.raises(TopicError):
        FLEET.blob(sha)


# --- device_of --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["update", "status"])
def test_device_of_inverts_the_topic_builders(kind: str) -> None:
    for device in ("watch-01", "a", "x" * 64, "d_1.2-3"):
        topic = getattr(FLEET, kind)(device)
        assert FLEET.device_of(topic, kind) == device


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("fedge/v1/fleet-2/update/watch-01", "update"),
        ("fedge/v1/fleet-10/update/watch-01", "update"),
        ("fedge/v1/fleet-1/status/watch-01", "update"),
        ("fedge/v1/fleet-1/update/watch-01", "status"),
        ("fedge/v2/fleet-1/update/watch-01", "update"),
        ("fedge/v1/fleet-1/update", "update"),
        ("fedge/v1/fleet-1/manifest", "update"),
        ("/fedge/v1/fleet-1/update/watch-01", "update"),
        ("FEDGE/v1/fleet-1/update/watch-01", "update"),
        ("", "update"),
    ],
    ids=[
        "other fleet",
        "fleet prefix",
        "other kind",
        "other kind reversed",
        "other version",
        "no device level",
        "manifest",
        "leading slash",
        "upper case root",
        "empty",
    ],
)
def test_device_of_refuses_a_foreign_topic(topic: str, kind: str) -> None:
    with pytest.raises(TopicError) as exc:
        FLEET.device_of(topic, kind)
    assert str(exc.value) == f"topic {topic!r} is not a {kind} topic of fleet 'fleet-1'"


@pytest.mark.parametrize(
    "device",
    ["", "watch-01/extra", "+", "#", "watch-01\n", "x" * 65, "watch 01", "/watch-01"],
    ids=[
        "empty level",
        "extra level",
        "plus",
        "hash",
        "trailing newline",
        "65 chars",
        "space",
        "double slash",
    ],
)
def test_device_of_refuses_a_malformed_device_level(device: str) -> None:
    with pytest.raises(TopicError) as exc:
        FLEET.device_of(f"fedge/v1/fleet-1/update/{device}", "update")
    assert str(exc.value) == f"invalid device id {device!r}: {ID_HINT}"
