"""docs/configuration.md stays true: it documents exactly the tables and keys each loader accepts
(``AGENT_TABLES``, ``AGGREGATOR_TABLES``, the sets the loaders pass to ``Table``), with the
types, defaults and ranges of ``fedge.tools.config_example`` (which test_config_example.py
holds to the loaders).

The page's format, which these tests parse: one markdown table per TOML table, under a heading
``## Agent: `[table]``` or ``## Aggregator: ...`` or ``## Agent and aggregator: ...``, with the
columns key | type | default | range | meaning and the key in backticks in the first column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedge.agent.config import AGENT_TABLES
from fedge.aggregator.config import AGGREGATOR_TABLES
from fedge.tools.config_example import SERVICES, Key, Section

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION_MD = REPO / "docs" / "configuration.md"

CODE_TABLES = {"agent": AGENT_TABLES, "aggregator": AGGREGATOR_TABLES}
HEADING = re.compile(r"^## (Agent|Aggregator|Agent and aggregator): `\[(\w+)\]`\s*$")
SERVICES_OF_HEADING = {
    "Agent": ("agent",),
    "Aggregator": ("aggregator",),
    "Agent and aggregator": ("agent", "aggregator"),
}
COLUMNS = ["key", "type", "default", "range", "meaning"]


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    range: str
    meaning: str


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_doc(text: str) -> dict[tuple[str, str], list[Row]]:
    """(service, table) -> the rows of the markdown table under that table's heading."""
    tables: dict[tuple[str, str], list[Row]] = {}
    current: list[Row] | None = None
    in_table = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            match = HEADING.match(line)
            current, in_table = None, False
            if match:
                current = []
                for service in SERVICES_OF_HEADING[match[1]]:
                    assert (service, match[2]) not in tables, f"line {number}: [{match[2]}] documented twice"
                    tables[service, match[2]] = current
            continue
        if current is None:
            continue
        if not line.startswith("|"):
            if in_table:  # one markdown table per heading: the first one
                current = None
            continue
        cells = _cells(line)
        if not in_table:
            assert cells == COLUMNS, f"line {number}: the columns must be {COLUMNS}, not {cells}"
            in_table = True
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        assert len(cells) == len(COLUMNS), f"line {number}: {len(cells)} cells, not {len(COLUMNS)}"
        key = re.fullmatch(r"`(\w+)`", cells[0])
        assert key, f"line {number}: the first cell must be the key in backticks, not {cells[0]!r}"
        current.append(Row(key[1], *cells[1:]))
    return tables


@pytest.fixture(scope="module")
def doc() -> dict[tuple[str, str], list[Row]]:
    return parse_doc(CONFIGURATION_MD.read_text(encoding="utf-8"))


def _cases() -> list[tuple[str, str]]:
    return [(service, table) for service, tables in CODE_TABLES.items() for table in tables]


def _section(service: str, table: str) -> Section:
    return next(s for s in SERVICES[service] if s.name == table)


def test_every_table_of_both_services_is_documented(doc: dict[tuple[str, str], list[Row]]) -> None:
    for service, tables in CODE_TABLES.items():
        documented = {table for s, table in doc if s == service}
        assert documented == set(tables), f"{service}: tables in the code vs in docs/configuration.md"


@pytest.mark.parametrize(("service", "table"), _cases())
def test_the_documented_keys_are_the_keys_the_loader_accepts(
    doc: dict[tuple[str, str], list[Row]], service: str, table: str
) -> None:
    rows = doc[service, table]
    keys = [row.key for row in rows]
    assert len(keys) == len(set(keys)), f"[{table}] documents a key twice: {sorted(keys)}"
    accepted = CODE_TABLES[service][table]
    assert not set(keys) - accepted, f"[{table}] documents keys the {service} refuses"
    assert not accepted - set(keys), f"[{table}] keys the {service} accepts but docs/configuration.md omits"


@pytest.mark.parametrize(("service", "table"), _cases())
def test_the_documented_types_defaults_and_ranges_are_the_codes(
    doc: dict[tuple[str, str], list[Row]], service: str, table: str
) -> None:
    section = _section(service, table)
    for row in doc[service, table]:
        key: Key = section.key(row.key)
        where = f"docs/configuration.md [{table}] {row.key}"
        assert row.type == key.kind, f"{where}: type {row.type!r}, the loader reads a {key.kind}"
        if key.required:
            assert row.default.startswith("required"), f"{where}: the key is required"
        elif key.default is not None:
            assert row.default.startswith(key.default_cell), f"{where}: the default is {key.default_cell}"
        else:
            assert row.default and "required" not in row.default, f"{where}: say what applies without it"
        assert key.range_text in row.range, f"{where}: the range is {key.range_text}, not {row.range!r}"
        assert row.meaning, f"{where}: no meaning"


def test_the_environment_overrides_are_documented() -> None:
    text = CONFIGURATION_MD.read_text(encoding="utf-8")
    for name in ("FEDGE_AGENT__TABLE__KEY", "FEDGE_AGGREGATOR__TABLE__KEY", "KUBERNETES_SERVICE_HOST"):
        assert name in text
    assert "config --example" in text


def test_the_parser_refuses_what_it_cannot_check() -> None:
    """The format is strict, so that a malformed page fails here instead of documenting nothing."""
    good = "## Agent: `[data]`\n\n| key | type | default | range | meaning |\n|---|---|---|---|---|\n"
    row = "| `seed` | integer | `0` | `0..2_147_483_647` | a seed |\n"
    assert parse_doc(good + row) == {
        ("agent", "data"): [Row("seed", "integer", "`0`", "`0..2_147_483_647`", "a seed")]
    }
    with pytest.raises(AssertionError, match="key in backticks"):
        parse_doc(good + row.replace("`seed`", "seed"))
    with pytest.raises(AssertionError, match="cells"):
        parse_doc(good + "| `seed` | integer | `0` |\n")
    with pytest.raises(AssertionError, match="columns"):
        parse_doc(good.replace("| range ", ""))
    with pytest.raises(AssertionError, match="documented twice"):
        parse_doc(good + row + good)
