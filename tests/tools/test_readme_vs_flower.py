"""README.md's fedge-vs-Flower table is exactly what bench/vs_flower_report.py renders from the
committed report of bench/bench_vs_flower.py (docs/results/vs_flower.json): it cannot drift."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "results" / "vs_flower.json"
README = ROOT / "README.md"


def _renderer() -> ModuleType:
    name = "vs_flower_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "vs_flower_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


vfr = _renderer()


@pytest.fixture
def report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REPORT.read_text())
    return data


def test_readme_table_is_rendered_from_the_committed_report(report: dict[str, Any]) -> None:
    text = README.read_text()
    assert text.count(vfr.BEGIN) == 1 and text.count(vfr.END) == 1
    assert vfr.section(text) == vfr.render_table(report), (
        "README.md's vs-Flower table is not the committed report's; regenerate it with "
        "`.venv/bin/python bench/vs_flower_report.py docs/results/vs_flower.json --readme README.md`"
    )
    # Rewriting the README from the report is a no-op.
    assert vfr.splice(text, vfr.render_table(report)) == text


def test_committed_report_is_a_full_run(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "bench_vs_flower"
    assert report["workload"]["rounds"] == 30
    assert report["workload"]["devices"] == 7
    assert report["versions"]["flwr"].startswith("1.42.")
    for side in ("fedge", "flower"):
        assert len(report[side]["accuracy"]) == 30
        assert len(report[side]["devices"]) == 7


@pytest.mark.parametrize("key", [key for key, _, _, _ in vfr.METRICS])
@pytest.mark.parametrize("side", ["fedge", "flower"])
def test_refuses_a_report_missing_a_metric(report: dict[str, Any], side: str, key: str) -> None:
    broken = copy.deepcopy(report)
    del broken[side][key]
    with pytest.raises(vfr.ReportError, match=rf"{side}\.{key} is missing"):
        vfr.render_table(broken)


def test_refuses_a_report_with_a_bad_metric_or_accuracy(report: dict[str, Any]) -> None:
    broken = copy.deepcopy(report)
    broken["flower"]["round_s_median"] = None
    with pytest.raises(vfr.ReportError, match=r"flower\.round_s_median is missing or not a finite number"):
        vfr.render_table(broken)
    broken = copy.deepcopy(report)
    broken["fedge"]["accuracy"] = broken["fedge"]["accuracy"][:-1]
    with pytest.raises(vfr.ReportError, match=r"fedge\.accuracy is not a list of 30"):
        vfr.render_table(broken)
    broken = copy.deepcopy(report)
    del broken["versions"]
    with pytest.raises(vfr.ReportError, match=r"versions\.flwr is missing"):
        vfr.render_table(broken)


def test_splice_needs_exactly_one_pair_of_markers() -> None:
    with pytest.raises(vfr.ReportError, match="expected one"):
        vfr.splice("no markers here\n", "table")
    text = f"a\n{vfr.BEGIN}\nold\n{vfr.END}\nb\n"
    assert vfr.splice(text, "new") == f"a\n{vfr.BEGIN}\nnew\n{vfr.END}\nb\n"
    with pytest.raises(vfr.ReportError, match="expected one"):
        vfr.splice(text + text, "new")
