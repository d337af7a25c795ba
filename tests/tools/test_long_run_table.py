"""docs/benchmarks.md's long-run table is what bench/bench_long_run.py renders from the committed
report (docs/results/long_run.json), and that report is a full run whose processes were flat."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "results" / "long_run.json"
DOC = ROOT / "docs" / "benchmarks.md"
MARKER = "<!-- long-run-table: bench/bench_long_run.py --replot docs/results/long_run.json -->\n```\n"


def _bench() -> ModuleType:
    name = "bench_long_run"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "bench"))  # its own imports (bench_fleet_budget, ...) live there
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "bench_long_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REPORT.read_text(encoding="utf-8"))
    return data


def test_the_docs_table_is_rendered_from_the_committed_report() -> None:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(MARKER) + len(MARKER)
    block = text[start : text.index("\n```", start)]
    assert block == _bench().render(_report()), (
        "docs/benchmarks.md's long-run table is stale: paste the output of "
        "`.venv/bin/python bench/bench_long_run.py --replot docs/results/long_run.json`"
    )


def test_the_committed_report_is_a_full_run_with_every_process_flat() -> None:
    report = _report()
    assert report["benchmark"] == "long_run"
    assert report["train_rounds"] == report["config"]["rounds"] == 1000
    assert report["rounds_not_aggregated_by_all"] == []
    names = {p["process"] for p in report["processes"]}
    assert {"aggregator", "broker"} <= names and len(names) == 2 + report["config"]["devices"]
    for p in report["processes"]:
        assert p["flat"] is True, p["process"]
        assert p["slope_kb_per_100_rounds"] < report["flat_rule"]["slope_kb_per_100_rounds_below"]
        assert p["second_half_growth_mb"] < report["flat_rule"]["growth_mb_below"]


def test_a_creeping_process_is_not_flat() -> None:
    """The verdict's own rule on a synthetic trace: 10 KiB a round forever is a leak."""
    bench = _bench()
    closes = [(k, float(k)) for k in range(1, 401)]
    leak = bench.Trace(
        "leak", 1, (), samples=[(float(k), 0.0, 50 * 2**20 + k * 10 * 1024) for k in range(402)]
    )
    fill = bench.Trace(
        "fill", 2, (), samples=[(float(k), 0.0, 50 * 2**20 + min(k, 150) * 10 * 1024) for k in range(402)]
    )
    assert bench.analyse("leak", leak, closes, 20)["flat"] is False
    assert bench.analyse("fill", fill, closes, 20)["flat"] is True
