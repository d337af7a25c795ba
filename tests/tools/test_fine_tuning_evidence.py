"""docs/fine-tuning.md's Evidence tables are the ones bench/bench_fine_tuning.py wrote to its
committed report (docs/results/fine_tuning.json): the page cannot drift from the numbers."""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_evidence_tables_of_docs_fine_tuning_md_are_the_benchmarks() -> None:
    report = json.loads((DOCS / "results" / "fine_tuning.json").read_text())
    page = (DOCS / "fine-tuning.md").read_text()
    evidence = page[page.index("## Evidence") :]
    assert report["benchmark"] == "fine_tuning" and report["rounds"] == 20
    lines: list[str] = report["table"]
    gap = lines.index("")
    for table in (lines[:gap], lines[gap + 1 :]):
        assert table and "\n".join(table) in evidence
    # Round 0 is the imported model as the vendor trained it: LiteRT scores what Keras scores.
    assert report["cnn_head"]["accuracy_per_round"][0] == report["vendor"]["keras_test_accuracy"]
    assert report["device_cost"]["same_arithmetic"]["passed"]
    assert (DOCS / "results" / "fine_tuning.png").stat().st_size > 0
