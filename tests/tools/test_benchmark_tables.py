"""docs/benchmarks.md's rounds tables are exactly what bench/rounds_report.py renders from the
committed report of bench/bench_rounds.py (docs/results/rounds.json): they cannot drift."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "results" / "rounds.json"
DOC = ROOT / "docs" / "benchmarks.md"
REGENERATE = (
    "regenerate them with `.venv/bin/python bench/rounds_report.py docs/results/rounds.json "
    "--doc docs/benchmarks.md`"
)


def _renderer() -> ModuleType:
    name = "rounds_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "rounds_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rr = _renderer()


@pytest.fixture
def report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REPORT.read_text(encoding="utf-8"))
    return data


def test_every_rounds_table_in_the_docs_is_rendered_from_the_committed_report(report: dict[str, Any]) -> None:
    text = DOC.read_text(encoding="utf-8")
    rendered = rr.render(report)
    assert set(rendered) == set(rr.SECTIONS)
    for name, block in rendered.items():
        assert rr.section(text, name) == block, f"docs/benchmarks.md's {name} table is stale; {REGENERATE}"
    assert rr.rewrite(text, report) == text  # rewriting the doc from the report is a no-op


def test_the_committed_report_is_a_full_default_run_whose_checks_passed(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "fedge-rounds"
    cfg = report["config"]
    assert (cfg["task"], cfg["layers"], cfg["parameter_count"]) == ("har-watch", [48, 64, 32, 7], 5447)
    assert (cfg["mqtt_devices"], cfg["engine_devices"], cfg["rss_devices"]) == (
        [10, 50, 100],
        [10, 100, 1000],
        [100, 1000, 5000],
    )
    assert report["checks_passed"] is True
    assert [(t["devices"], t["codec"]) for t in report["throughput"]] == [
        (n, c) for n in (10, 100, 1000) for c in ("fp32", "fp16", "int8")
    ]


def test_the_check_mode_fails_on_a_stale_table_and_names_the_fix(
    report: dict[str, Any], tmp_path: Path
) -> None:
    stale = copy.deepcopy(report)
    stale["throughput"][0]["handle_cpu_us"] *= 2  # the doc no longer matches this report
    stale_path = tmp_path / "rounds.json"
    stale_path.write_text(json.dumps(stale), encoding="utf-8")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC.read_text(encoding="utf-8"), encoding="utf-8")
    script = str(ROOT / "bench" / "rounds_report.py")
    done = subprocess.run(
        [sys.executable, script, str(stale_path), "--doc", str(doc), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"rounds_report: {doc}'s tables are not {stale_path}'s; rerun without --check"
    )
    assert doc.read_text(encoding="utf-8") == DOC.read_text(encoding="utf-8")  # nothing written
    fresh = subprocess.run(
        [sys.executable, script, str(stale_path), "--doc", str(doc)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "<!-- rounds-throughput:begin -->" in fresh.stdout
    assert rr.section(doc.read_text(encoding="utf-8"), "throughput") == rr.render(stale)["throughput"]


def test_a_report_without_a_value_the_tables_need_is_refused_by_name(report: dict[str, Any]) -> None:
    broken = copy.deepcopy(report)
    del broken["throughput"][3]["decrypt_only_cpu_us_box_cached"]  # N=100, fp32
    with pytest.raises(
        rr.ReportError, match=r"^the report has no throughput\.3\.decrypt_only_cpu_us_box_cached$"
    ):
        rr.render(broken)
