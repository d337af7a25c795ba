"""docs/async.md's benchmark table is exactly what bench/bench_async.py renders from the committed
results (docs/results/async.json): the numbers quoted cannot drift from the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_async_doc_table_is_the_rendered_results() -> None:
    spec = importlib.util.spec_from_file_location("bench_async", REPO / "bench" / "bench_async.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = json.loads((REPO / "docs" / "results" / "async.json").read_text())
    table = bench.render(results)
    assert table in (REPO / "docs" / "async.md").read_text(), (
        'regenerate the table: .venv/bin/python -c \'import json,sys; sys.path.insert(0, "bench"); '
        'import bench_async; print(bench_async.render(json.load(open("docs/results/async.json"))))\''
    )
