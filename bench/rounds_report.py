"""docs/benchmarks.md's tables of the rounds benchmark, rendered from ``bench/bench_rounds.py``'s
JSON report, so the numbers in the docs are always one run's and cannot drift from it.

Pure and light: the standard library only, so the test that keeps docs/benchmarks.md in step with
``docs/results/rounds.json`` (tests/tools/test_benchmark_tables.py) runs anywhere.

Each table sits between its own markers in docs/benchmarks.md (``<!-- rounds-NAME:begin -->`` and
``<!-- rounds-NAME:end -->``, NAME one of :data:`SECTIONS`):

- ``render(report) -> dict[str, str]``: every section's markdown (a ``ReportError`` naming the
  first missing or malformed value if the report lacks one);
- ``splice(text, name, block) -> str``: ``text`` with that section's block replaced;
- ``publish(report, docs_json=..., doc=...)``: writes the committed copy and rewrites the doc.

Usage (after a run of the bench): ``python bench/rounds_report.py bench/results/rounds.json
--docs-json docs/results/rounds.json --doc docs/benchmarks.md``; ``--check`` only says (exit 1)
whether the doc's tables differ from what the report renders.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MB = 1_000_000


class ReportError(ValueError):
    """The report lacks a value a table needs, or the doc lacks a section's markers."""


def begin(name: str) -> str:
    return f"<!-- rounds-{name}:begin -->"


def end(name: str) -> str:
    return f"<!-- rounds-{name}:end -->"


def _get(report: dict[str, Any], *path: str | int) -> Any:
    value: Any = report
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise ReportError(f"the report has no {'.'.join(map(str, path))}") from None
    return value


def _num(report: dict[str, Any], *path: str | int) -> float:
    value = _get(report, *path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{'.'.join(map(str, path))} is {value!r}, not a number")
    return float(value)


def _table(head: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; ``align`` has one ``l`` or ``r`` per column."""
    marks = [
        "|"
        + "|".join(
            ("-" * (len(h) + 1) + ":") if a == "r" else "-" * (len(h) + 2)
            for h, a in zip(head, align, strict=True)
        )
        + "|"
    ]
    lines = ["| " + " | ".join(head) + " |", *marks]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine(report: dict[str, Any]) -> str:
    m = _get(report, "machine")
    v = _get(report, "machine", "versions")
    return (
        f"{_get(m, 'machine')} VM, {_get(m, 'cpu_model')}, **{_get(m, 'cpu_count')} CPUs** (shared), "
        f"Python {_get(m, 'python')}, mosquitto {_get(v, 'mosquitto')}, paho-mqtt {_get(v, 'paho-mqtt')}, "
        f"PyNaCl {_get(v, 'pynacl')}, numpy {_get(v, 'numpy')}. One run "
        f"(`docs/results/rounds.json`, {_get(report, 'timestamp')}, "
        f"total {_num(report, 'duration_s'):.0f} s)."
    )


def overhead(report: dict[str, Any]) -> str:
    rows = []
    for i in range(len(_get(report, "mqtt_rounds"))):
        p = ("mqtt_rounds", i)
        rows.append(
            (
                f"{_num(report, *p, 'devices'):.0f}",
                f"{_num(report, *p, 'overhead_ms_median'):.1f} ms",
                f"{_num(report, *p, 'last_update_out_ms_median'):.1f} ms "
                f"({_num(report, *p, 'device_work_ms_median'):.2f} ms)",
                f"{_num(report, *p, 'aggregator_tail_ms_median'):.1f} ms",
                f"{_num(report, *p, 'aggregator_peak_rss_mb'):.1f} MB",
                f"{_num(report, *p, 'status_bytes_per_round_median'):,.0f} B",
            )
        )
    s = ("scaling",)
    note = (
        f"Marginal cost {_num(report, *s, 'round_overhead_marginal_ms_per_device'):.2f} ms per device; "
        f"overhead N={rows[-1][0]} / N={rows[0][0]} = "
        f"{_num(report, *s, 'round_overhead_ratio_nmax_over_nmin'):.1f}x; aggregator peak RSS "
        f"N={rows[-1][0]} / N={rows[0][0]} = "
        f"{_num(report, *s, 'aggregator_peak_rss_ratio_nmax_over_nmin'):.2f}x. The aggregator process spent "
        f"{_num(report, *s, 'aggregator_service_cpu_ms_per_update'):.2f} ms of CPU per update it received "
        "(slope of its CPU time over the updates of the smallest and largest fleet)."
    )
    head = (
        "devices",
        "overhead",
        "sim devices (per device)",
        "aggregator tail",
        "aggregator peak RSS",
        "statuses published per round",
    )
    return _table(head, "rrrrrr", rows) + "\n\n" + note


def throughput(report: dict[str, Any]) -> str:
    by_n: dict[int, dict[str, int]] = {}
    for i, t in enumerate(_get(report, "throughput")):
        by_n.setdefault(int(_num(report, "throughput", i, "devices")), {})[str(_get(t, "codec"))] = i
    rows = []
    for n, cells in by_n.items():
        if set(cells) != {"fp32", "fp16", "int8"}:
            raise ReportError(f"throughput at N={n} has codecs {sorted(cells)}, not fp32, fp16 and int8")
        f = ("throughput", cells["fp32"])
        rows.append(
            (
                f"{n}",
                *(
                    f"{_num(report, 'throughput', cells[c], 'updates_per_cpu_s'):,.0f}"
                    for c in ("fp32", "fp16", "int8")
                ),
                f"{_num(report, *f, 'handle_cpu_us'):.0f} µs",
                f"{_num(report, *f, 'decrypt_only_cpu_us_box_per_message'):.0f} / "
                f"{_num(report, *f, 'decrypt_only_cpu_us_box_cached'):.0f} µs",
                f"{_num(report, *f, 'handle_over_cached_decrypt_cpu'):.1f}x",
                f"{_num(report, *f, 'updates_per_s'):,.0f}",
                f"{_num(report, *f, 'close_round_ms'):.2f} ms",
                f"{_num(report, *f, 'checkpoint_ms'):.1f} ms",
                f"{_num(report, *f, 'open_round_ms'):.1f} ms",
            )
        )
    head = (
        "devices",
        "fp32 upd/s",
        "fp16 upd/s",
        "int8 upd/s",
        "fp32 CPU per update",
        "decrypt only, Box per message / cached",
        "fp32 ÷ cached decrypt",
        "fp32 upd/s, wall clock",
        "close_round",
        "checkpoint",
        "open_round + sign",
    )
    return _table(head, "rrrrrrrrrrr", rows)


def engine_rss(report: dict[str, Any]) -> str:
    p = _num(report, "config", "parameter_count")
    rows = []
    for i in range(len(_get(report, "engine_rss", "runs"))):
        r = ("engine_rss", "runs", i)
        devices = _num(report, *r, "devices")
        rows.append(
            (
                f"{devices:.0f}",
                f"{_num(report, *r, 'peak_rss_bytes') / MB:.1f} MB",
                f"{_num(report, *r, 'rss_before_rounds_bytes') / MB:.1f} MB",
                f"{devices * 4 * p / MB:.1f} MB",
            )
        )
    base = _num(report, "engine_rss", "baseline_imports", "peak_rss_bytes") / MB
    head = ("devices", "peak RSS", "RSS before the rounds", "keeping every fp32 delta would add")
    modules = ", ".join(_get(report, "engine_rss", "baseline_imports", "third_party_modules"))
    return (
        f"Imports alone (Python with the aggregator's modules: {modules}): **{base:.1f} MB**.\n\n"
        + _table(head, "rrrr", rows)
    )


def update_bytes(report: dict[str, Any]) -> str:
    s = ("sizes",)
    fp32 = _num(report, *s, "codecs", "fp32", "sealed_bytes")
    rows = []
    for codec in ("fp32", "fp16", "int8"):
        c = (*s, "codecs", codec)
        rows.append(
            (
                f"fedge {codec}, sealed",
                f"{_num(report, *c, 'sealed_bytes'):,.0f}",
                f"{_num(report, *c, 'mqtt5_publish_bytes'):,.0f}",
                f"{_num(report, *c, 'ratio_vs_fp32_sealed'):.2f}x",
                f"{_num(report, *c, 'device_encode_seal_us'):.0f} µs",
            )
        )
    labels = {
        "numpy_save": "naive `numpy.save` (plaintext)",
        "pickle_ndarray": "naive pickle of the array",
        "pickle_dict_with_metadata": "naive pickle of a dict with metadata",
        "json_float_list": "naive JSON float list",
    }
    for key, label in labels.items():
        size = _num(report, *s, "naive", key, "bytes")
        rows.append((label, f"{size:,.0f}", "–", f"{size / fp32:.2f}x", "–"))
    dm = (*s, "device_manifest_us")
    head = ("encoding", "bytes", "MQTT 5 PUBLISH", "vs fedge fp32", "device encode + seal")
    return (
        f"{_num(report, *s, 'parameter_count'):,.0f} parameters; raw float32 "
        f"{_num(report, *s, 'raw_float32_bytes'):,.0f} B.\n\n"
        + _table(head, "lrrrr", rows)
        + f"\n\nA device's manifest ({_num(report, *dm, 'frame_bytes'):,.0f} B with "
        f"{_num(report, *dm, 'selected_devices'):.0f} devices selected): verify "
        f"{_num(report, *dm, 'verify_us'):,.0f} µs, parse {_num(report, *dm, 'parse_us'):,.0f} µs."
    )


def verdicts(report: dict[str, Any]) -> str:
    lines = []
    for i in range(len(_get(report, "targets"))):
        t = ("targets", i)
        verdict = "pass" if _get(report, *t, "passed") else "MISS"
        unit = _get(report, *t, "unit")
        lines.append(
            f"Target: {_get(report, *t, 'description')} — **{verdict}** "
            f"({_num(report, *t, 'value'):{'.1f' if unit == 'MB' else ',.0f'}} {unit})."
        )
    failed = [name for name, c in _get(report, "checks").items() if not _get(c, "passed")]
    lines.append(
        "All validity checks passed." if not failed else f"Validity checks FAILED: {', '.join(failed)}."
    )
    return "\n".join(lines)


#: Every section of docs/benchmarks.md this module writes, by marker name.
SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "machine": machine,
    "overhead": overhead,
    "throughput": throughput,
    "engine-rss": engine_rss,
    "bytes": update_bytes,
    "verdicts": verdicts,
}


def _wrap(block: str) -> str:
    """Prose paragraphs wrapped at 96 columns like the rest of the doc; tables left as they are."""
    paragraphs = block.split("\n\n")
    return "\n\n".join(
        p
        if p.startswith("|")
        else "\n".join(textwrap.fill(line, 96, break_on_hyphens=False) for line in p.split("\n"))
        for p in paragraphs
    )


def render(report: dict[str, Any]) -> dict[str, str]:
    if _get(report, "benchmark") != "fedge-rounds":
        raise ReportError(f"not a bench_rounds.py report: benchmark is {report.get('benchmark')!r}")
    return {name: _wrap(fn(report)) for name, fn in SECTIONS.items()}


def splice(text: str, name: str, block: str) -> str:
    """``text`` with everything between section ``name``'s markers replaced by ``block``."""
    b, e = begin(name), end(name)
    if text.count(b) != 1 or text.count(e) != 1 or text.index(b) > text.index(e):
        raise ReportError(f"expected one {b} ... {e} section")
    head, rest = text.split(b, 1)
    _, tail = rest.split(e, 1)
    return f"{head}{b}\n{block}\n{e}{tail}"


def section(text: str, name: str) -> str:
    """What is between section ``name``'s markers now (without the newlines next to them)."""
    b, e = begin(name), end(name)
    if text.count(b) != 1 or text.count(e) != 1:
        raise ReportError(f"expected one {b} ... {e} section")
    return text.split(b, 1)[1].split(e, 1)[0].strip("\n")


def rewrite(text: str, report: dict[str, Any]) -> str:
    for name, block in render(report).items():
        text = splice(text, name, block)
    return text


def publish(report: dict[str, Any], docs_json: Path | None = None, doc: Path | None = None) -> None:
    """Writes the committed copy of the report and/or the doc's tables (all rendered first)."""
    new_doc = rewrite(doc.read_text(encoding="utf-8"), report) if doc is not None else None
    if docs_json is not None:
        docs_json.parent.mkdir(parents=True, exist_ok=True)
        docs_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if doc is not None and new_doc is not None:
        doc.write_text(new_doc, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("report", type=Path, help="a JSON report of bench/bench_rounds.py")
    p.add_argument("--docs-json", type=Path, help="write a copy here (the committed one)")
    p.add_argument("--doc", type=Path, help="rewrite the tables between the rounds-* markers")
    p.add_argument(
        "--check", action="store_true", help="with --doc: exit 1 if its tables differ, write nothing"
    )
    a = p.parse_args(argv)
    try:
        report = json.loads(a.report.read_text(encoding="utf-8"))
        if a.check:
            if a.doc is None:
                p.error("--check needs --doc")
            text = a.doc.read_text(encoding="utf-8")
            if rewrite(text, report) != text:
                print(
                    f"rounds_report: {a.doc}'s tables are not {a.report}'s; rerun without --check",
                    file=sys.stderr,
                )
                return 1
            return 0
        publish(report, a.docs_json, a.doc)
    except (OSError, json.JSONDecodeError, ReportError) as exc:
        print(f"rounds_report: {exc}", file=sys.stderr)
        return 1
    for name, block in render(report).items():
        print(f"{begin(name)}\n{block}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
