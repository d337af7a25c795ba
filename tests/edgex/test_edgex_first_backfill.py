"""The first core-data backfill (no cursor yet) and a historical export loaded into core-data:
by default it reads one day back and says how to read everything; ``[edgex] first_backfill_s
= 0`` reads everything core-data holds. Real core-data double (checked against the EdgeX
OpenAPI in tests/edgex/test_edgex_core_data.py), real sample store."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_edgex_ingest import DAY, DEVICE, MINUTE, NOW, NS, YEAR, Clock, event_json, occupancy_task

from fedge.agent.edgex.core_data import CoreDataClient
from fedge.agent.edgex.ingest import FIRST_BACKFILL_S, BackfillCursor, EdgeXIngest
from fedge.agent.sample_store import SampleStore
from fedge.lab.edgex_core_data_server import CoreDataServer

ROWS = 30


@pytest.fixture()
def core_data() -> Iterator[CoreDataServer]:
    """Three-year-old minutes of one room, as an operator loads an export into core-data."""
    with CoreDataServer() as server:
        start = NOW - 3 * YEAR
        for i in range(ROWS):
            server.add_event(
                json.loads(
                    event_json(
                        int((start + i * MINUTE) * NS),
                        [20.0 + i, 30.0, 400.0, 600.0, 0.004],
                        "true" if i % 2 else "false",
                    )
                )
            )
        yield server


def backfill(tmp_path: Path, server: CoreDataServer, first_backfill_s: float) -> EdgeXIngest:
    store = SampleStore(tmp_path / "samples.sqlite", 1000, 0)  # keep any age: only the backfill decides
    ingest = EdgeXIngest(
        DEVICE,
        occupancy_task(),
        store,
        {},
        None,
        "edgex",
        CoreDataClient(server.url),
        BackfillCursor(tmp_path / "cursor.json"),
        clock=Clock(),
        first_backfill_s=first_backfill_s,
    )
    ingest._backfill()
    ingest._flush()
    return ingest


def test_by_default_the_first_backfill_reads_one_day_and_says_how_to_read_more(
    tmp_path: Path, core_data: CoreDataServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert FIRST_BACKFILL_S == DAY
    with caplog.at_level(logging.INFO, logger="fedge.agent.edgex"):
        ingest = backfill(tmp_path, core_data, FIRST_BACKFILL_S)
    assert ingest.backfilled_readings == 0 and ingest.available() == 0
    assert any(
        "older ones in core-data are not read (set [edgex] first_backfill_s = 0 to read everything"
        in r.getMessage()
        for r in caplog.records
    )


def test_first_backfill_zero_reads_a_historical_export_from_core_data(
    tmp_path: Path, core_data: CoreDataServer
) -> None:
    ingest = backfill(tmp_path, core_data, 0)
    assert ingest.backfilled_readings == ROWS * 6
    assert ingest.available() == ROWS
    assert ingest.report()["store"]["expired"] == 0
