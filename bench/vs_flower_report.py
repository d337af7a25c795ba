"""The README's fedge-vs-Flower table, rendered from ``bench/bench_vs_flower.py``'s JSON report.

Pure and light: the standard library only (no Flower, no numpy), so the test that keeps README.md
in step with ``docs/results/vs_flower.json`` runs anywhere.

- ``render_table(report) -> str``: the markdown between the README's markers (a ``ReportError``
  naming the first missing or malformed metric if the report lacks one);
- ``splice(text, block) -> str``: ``text`` with the block between ``BEGIN`` and ``END`` replaced;
- ``publish(report, docs_json=..., readme=...)``: writes the committed copy and rewrites README.md.

Usage (after a run of the bench): ``python bench/vs_flower_report.py bench/results/vs_flower.json
--docs-json docs/results/vs_flower.json --readme README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- vs-flower:begin -->"
END = "<!-- vs-flower:end -->"
MB = 1_000_000

#: The compared metrics: (key in each side's summary, row label, unit, "lower" or "higher" is better).
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("round_s_median", "median round time", "s", "lower"),
    ("device_peak_rss_bytes", "peak RSS of one device's whole process tree", "MB", "lower"),
    ("device_cpu_s_per_round", "device CPU-seconds per round (whole run / R)", "cpu", "lower"),
    ("device_cpu_s_per_round_steady", "device CPU-seconds per round (steady: rounds 2..R)", "cpu", "lower"),
    (
        "device_bytes_up_per_round",
        "bytes sent up per device per round, on the wire (whole run / R)",
        "KB",
        "lower",
    ),
    (
        "device_bytes_up_per_round_steady",
        "bytes sent up per device per round, on the wire (steady)",
        "KB",
        "lower",
    ),
    ("final_accuracy", "held-out accuracy after the last round", "acc", "higher"),
)
#: The accuracy row that smooths round-to-round noise: the mean of the last this many rounds.
LAST_ROUNDS = 5
#: Rounds whose held-out accuracy gets a row of its own (those not past the run's last round).
ACCURACY_ROUNDS = (1, 5, 10, 20)


class ReportError(ValueError):
    """The report lacks a metric the table needs, or has one of the wrong kind."""


def _number(report: dict[str, Any], side: str, key: str) -> float:
    part = report.get(side)
    if not isinstance(part, dict):
        raise ReportError(f"vs-Flower report: no {side!r} section")
    value = part.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"vs-Flower report: {side}.{key} is missing or not a finite number ({value!r})")
    if value < 0:
        raise ReportError(f"vs-Flower report: {side}.{key} is negative ({value!r})")
    return float(value)


def _accuracy(report: dict[str, Any], side: str, rounds: int) -> list[float]:
    values = report[side].get("accuracy")
    if not isinstance(values, list) or len(values) != rounds:
        raise ReportError(f"vs-Flower report: {side}.accuracy is not a list of {rounds} per-round values")
    if not all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in values):
        raise ReportError(f"vs-Flower report: {side}.accuracy has a value outside [0, 1]")
    return [float(v) for v in values]


def _text(report: dict[str, Any], *path: str) -> str:
    node: Any = report
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None or isinstance(node, dict | list):
        raise ReportError(f"vs-Flower report: {'.'.join(path)} is missing")
    return str(node)


def check(report: dict[str, Any]) -> None:
    """Raises ``ReportError`` naming the first metric the table needs that the report lacks."""
    render_table(report)


def _fmt(unit: str, v: float) -> str:
    if unit == "s":
        return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
    if unit == "MB":
        return f"{v / MB:.0f} MB"
    if unit == "cpu":
        return f"{v:.2f} s" if v >= 0.1 else f"{v:.3f} s"
    if unit == "KB":
        return f"{v / 1000:.1f} KB"
    return f"{v:.3f}"


def _ratio(fedge: float, flower: float) -> str:
    if flower == 0:
        return "-"
    r = fedge / flower
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def _ahead(better: str, fedge: float, flower: float) -> str:
    wins = fedge < flower if better == "lower" else fedge > flower
    return "fedge" if wins else ("tie" if fedge == flower else "**Flower**")


def render_table(report: dict[str, Any]) -> str:
    """The markdown block between the README's markers (markers not included)."""
    if not isinstance(report, dict):
        raise ReportError("vs-Flower report: not a JSON object")
    flwr = _text(report, "versions", "flwr")
    rounds_text = _text(report, "workload", "rounds")
    if not rounds_text.isdigit() or int(rounds_text) < 2:
        raise ReportError(f"vs-Flower report: workload.rounds is not a round count ({rounds_text!r})")
    rounds = int(rounds_text)
    cpus = _text(report, "machine", "cpu_count")
    values = {
        key: (_number(report, "fedge", key), _number(report, "flower", key)) for key, _, _, _ in METRICS
    }
    acc_fedge = _accuracy(report, "fedge", rounds)
    acc_flower = _accuracy(report, "flower", rounds)
    if (
        abs(acc_fedge[-1] - values["final_accuracy"][0]) > 1e-12
        or abs(acc_flower[-1] - values["final_accuracy"][1]) > 1e-12
    ):
        raise ReportError("vs-Flower report: final_accuracy is not the last round's accuracy")

    compared: list[tuple[str, str, str, float, float]] = []  # label, unit, better, fedge, Flower
    for key, label, unit, better in METRICS:
        if key == "final_accuracy":
            compared += [
                (f"held-out accuracy after round {r}", unit, better, acc_fedge[r - 1], acc_flower[r - 1])
                for r in ACCURACY_ROUNDS
                if r < rounds
            ]
            label = f"held-out accuracy after round {rounds} (the last)"
        compared.append((label, unit, better, *values[key]))
        if key == "final_accuracy" and rounds >= LAST_ROUNDS:
            # One round's accuracy moves by a point or two from round to round on both sides.
            compared.append(
                (
                    f"held-out accuracy, mean of the last {LAST_ROUNDS} rounds",
                    unit,
                    better,
                    sum(acc_fedge[-LAST_ROUNDS:]) / LAST_ROUNDS,
                    sum(acc_flower[-LAST_ROUNDS:]) / LAST_ROUNDS,
                )
            )
    rows = [
        f"| {rounds} rounds, 7 devices, median device | fedge | Flower {flwr} | fedge / Flower | ahead |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| {label} | {_fmt(unit, fe)} | {_fmt(unit, fl)} | {_ratio(fe, fl)} | {_ahead(better, fe, fl)} |"
        for label, unit, better, fe, fl in compared
    ]
    behind = [label for label, _, better, fe, fl in compared if _ahead(better, fe, fl) != "fedge"]
    acc_behind = sum(1 for a, b in zip(acc_fedge, acc_flower, strict=True) if a <= b)
    verdict = (
        "fedge is ahead on every row" if not behind else "fedge is **not** ahead on: " + "; ".join(behind)
    )
    verdict += (
        f"; its held-out accuracy is at or below Flower's after {acc_behind} of the {rounds} rounds."
        if acc_behind
        else f", and more accurate than Flower after each of the {rounds} rounds."
    )
    proxy = report["flower"].get("device_bytes_up_per_round_proxy")
    proxy_note = (
        f" Flower's bytes up counted a second way, by a TCP proxy in front of the SuperLink: "
        f"{_fmt('KB', float(proxy))} per round."
        if isinstance(proxy, int | float)
        else ""
    )
    note = (
        f"Measured on a {cpus}-core machine, both sides in one run of `bench/bench_vs_flower.py`; "
        f"{verdict}{proxy_note} Per-round numbers: `docs/results/vs_flower.json`."
    )
    return "\n".join(rows) + "\n\n" + textwrap.fill(note, width=96, break_on_hyphens=False)


def splice(text: str, block: str) -> str:
    """``text`` with everything between the BEGIN and END markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ReportError(f"expected one {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def section(text: str) -> str:
    """What is between the markers now (without the newlines next to them)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ReportError(f"expected one {BEGIN} ... {END} section")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def publish(report: dict[str, Any], docs_json: Path | None = None, readme: Path | None = None) -> None:
    """Writes the committed copy of the report and/or the README's table (checked first)."""
    block = render_table(report)
    new_readme = splice(readme.read_text(), block) if readme is not None else None
    if docs_json is not None:
        docs_json.parent.mkdir(parents=True, exist_ok=True)
        docs_json.write_text(json.dumps(report, indent=2) + "\n")
    if readme is not None and new_readme is not None:
        readme.write_text(new_readme)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("report", type=Path, help="a JSON report of bench/bench_vs_flower.py")
    p.add_argument("--docs-json", type=Path, help="write a copy here (the committed one)")
    p.add_argument("--readme", type=Path, help="rewrite the table between the vs-flower markers")
    a = p.parse_args(argv)
    try:
        report = json.loads(a.report.read_text())
        publish(report, a.docs_json, a.readme)
    except (OSError, json.JSONDecodeError, ReportError) as exc:
        print(f"vs_flower_report: {exc}", file=sys.stderr)
        return 1
    print(render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
