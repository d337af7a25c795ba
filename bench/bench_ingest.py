"""CPU per reading of the agent's EdgeX ingest, stage by stage, in-process (issue 18).

The demo's default path hands every EdgeX message to :func:`fedge.agent.edgex.wire.decode_message`
(paho's thread), queues the events, and the ingest thread builds samples (the labelled builder for
training and the unlabelled one for live prediction windows) and stores them. This benchmark
feeds that path the very bytes ``fedge demo`` publishes (``fedge.lab.edgex_simulate``'s events of
one subject, 50 rows x 7 readings, encoded with :func:`encode_envelope` as EdgeX v4 JSON) and
reports CPU microseconds per reading (``time.process_time``; the process runs one thread) for:

- ``json_loads``: ``json.loads`` of the same payloads alone, the floor any JSON path pays;
- ``bounded_parse``: :func:`loads_bounded` as the wire decoder calls it (size, UTF-8, nesting
  checked before parsing);
- ``decode``: the whole :func:`decode_message` (parse, validation, readings);
- ``builder``: the labelled :class:`SampleBuilder` (screening, reordering, alignment, windows and
  features) on the decoded events; ``live_builder``: the unlabelled one on the same events;
- ``features``: :func:`extract_features` and :func:`window_labels` alone on the same rows;
- ``store``: :meth:`SampleStore.add_counted` of the samples, one batch per event;
- ``ingest``: the whole in-process path as the agent runs it, one message at a time (the
  queue never holds more than one event, as when the stream is slower than the ingest):
  ``decode_message`` -> ``EdgeXIngest._on_events`` -> the queued event -> ``feed`` (both
  builders, the store, the cursor), with a real store and cursor in a temporary directory;
- ``ingest_queued``: every message decoded and queued first, then the ingest thread's own loop
  (``EdgeXIngest._run``, here in the main thread) drains the queue: a backlog replayed faster
  than it is stored, as in the demo.

What it does not see: paho's receive thread (reading the socket, TLS, the MQTT packet) and the
broker; ``make bench-agent-budget`` measures the whole agent process with those.

``--baseline REF`` runs the same stages, in a fresh interpreter, on the sources of git revision
``REF`` (extracted with ``git archive`` to a temporary directory), so the report compares the
code before and after in the same run on the same machine load. Each stage is run ``--repeat``
times (default 3); the table gives the median and the range.

Usage: ``python bench/bench_ingest.py [--rows N] [--repeat 3] [--baseline REF] [--profile]
[--out bench/results/ingest.json]`` (``make bench-ingest``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "ingest.json"
SUBJECT = 1
STAGES = (
    "json_loads",
    "bounded_parse",
    "decode",
    "builder",
    "live_builder",
    "features",
    "store",
    "ingest",
    "ingest_queued",
)
#: Packages whose sources ``--baseline`` swaps for the revision's.
_SOURCE_DIRS = ("agent", "protocol", "shell", "lab", "tools", "aggregator", "tasks", "edgex_profiles")


def payloads(rows: int | None) -> tuple[list[bytes], int]:
    """The demo's messages for one subject (fixed ids: reproducible bytes) and their readings."""
    from fedge.agent.edgex.wire import edgex_event_topic, encode_envelope
    from fedge.lab import har_watch
    from fedge.lab.edgex_simulate import PROFILE, SERVICE, SimulateOptions, device_events

    recordings = [r for r in har_watch.load_recordings() if r.subject == SUBJECT]
    options = SimulateOptions(broker_url="mqtt://localhost")
    start_ns = 1_700_000_000_000_000_000
    out: list[bytes] = []
    readings = 0
    for i, event in enumerate(
        device_events(SUBJECT, recordings, start_ns, options.batch_rows, options.gap_s, max_rows=rows)
    ):
        topic = edgex_event_topic(options.prefix, SERVICE, PROFILE, event.device, event.source)
        ids = f"00000000-0000-4000-8000-{i:012d}"
        out.append(encode_envelope(event, "v4", topic, correlation_id=ids, request_id=ids))
        readings += len(event.readings)
    return out, readings


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def run_stages(rows: int | None, repeat: int, profile: bool) -> dict[str, Any]:
    """Every stage ``repeat`` times; CPU-us per reading of each run."""
    from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
    from fedge.agent.edgex.profile import load_profile
    from fedge.agent.edgex.samples import SampleBuilder
    from fedge.agent.edgex.wire import MAX_DOCUMENT_DEPTH, decode_message
    from fedge.agent.features import extract_features, window_labels
    from fedge.agent.sample_store import SampleStore
    from fedge.agent.wiring import read_task_file
    from fedge.protocol.bounded_json import loads_bounded

    task = read_task_file(ROOT / "tasks" / "har-watch.toml")
    profile_doc = load_profile(ROOT / "edgex_profiles" / "wearable-imu.yaml")
    limits = {r.name: (r.minimum, r.maximum) for r in profile_doc.resources}
    messages, n_readings = payloads(rows)
    device = f"watch-{SUBJECT:02d}"
    events = [e for m in messages for e in decode_message(m).events]
    spec = task.features

    def builder_stage(labelled: bool) -> Callable[[], Any]:
        def run() -> Any:
            b = SampleBuilder(task, limits, device=device, labelled=labelled)
            out = [b.add(e.readings) for e in events]
            out.append(b.flush())
            return out

        return run

    batches = builder_stage(True)()
    samples_per_batch = [b for b in batches if b]
    n_samples = sum(len(b) for b in samples_per_batch)
    # The rows the builder aligns, as arrays: what extract_features sees (one call per event).
    columns = {name: i for i, name in enumerate(spec.resources)}
    classes = {name: i for i, name in enumerate(task.label.classes or ())}
    blocks: list[tuple[Any, Any]] = []
    import numpy as np

    for e in events:
        x = np.zeros((len(e.readings) // 7, len(columns)))
        y = np.zeros(len(e.readings) // 7, np.int64)
        for j, r in enumerate(e.readings):
            if r.resource in columns:
                x[j // 7, columns[r.resource]] = r.value
            else:
                y[j // 7] = classes[r.value]
        blocks.append((x, y))

    def features_stage() -> Any:
        # The builder keeps the rows of an unfinished window and adds the next event's: two
        # events' rows (100 rows, one window) per call, as in the stream.
        out = []
        prev_x, prev_y = blocks[0]
        for x, y in blocks[1:]:
            bx, by = np.concatenate([prev_x[-50:], x]), np.concatenate([prev_y[-50:], y])
            out.append((extract_features(bx, spec), window_labels(by, spec.window, task.model.kind)))
            prev_x, prev_y = x, y
        return out

    def store_stage(tmp: Path) -> Callable[[], Any]:
        def run() -> Any:
            store = SampleStore(tmp / f"samples-{time.monotonic_ns()}.db", 200_000, 0)
            return [store.add_counted(b, "k" * 32, time.time()) for b in samples_per_batch]

        return run

    def fresh_ingest(tmp: Path, prefix: str, each: Callable[[EdgeXIngest], None] | None) -> EdgeXIngest:
        """A live ingest on its own store and cursor, given every message as paho's thread gives
        it (decoded, its events queued); ``each`` runs after each message (the ingest thread's
        part, interleaved), or none: the queue then holds them all."""
        d = tmp / f"{prefix}-{time.monotonic_ns()}"
        d.mkdir()
        store = SampleStore(d / "samples.db", 200_000, 0)
        ingest = EdgeXIngest(
            device, task, store, limits, None, "edgex", None, BackfillCursor(d / "cursor.json"), live=True
        )
        if each is None:
            # The agent's queue is bounded (32 events since 28fae54): put() would block this,
            # the only thread, for ever. The backlog stage measures a queue that holds it all.
            ingest.inbox = queue.Queue()
        for m in messages:
            result = decode_message(m, 1024 * 1024)
            if result.events:
                ingest._on_events(result.events)
            if each is not None:
                each(ingest)
        return ingest

    def drain(ingest: EdgeXIngest) -> None:
        while not ingest.inbox.empty():  # the ingest thread: build, store
            item = ingest.inbox.get_nowait()
            assert item
            if hasattr(ingest, "feed_events"):
                ingest.feed_events(item)
            else:  # before feed_events: what the ingest thread did
                ingest.feed(r for event in item for r in event.readings)

    def ingest_stage(tmp: Path) -> Callable[[], Any]:
        def run() -> Any:
            ingest = fresh_ingest(tmp, "ingest", drain)
            ingest._flush()
            return ingest.report()

        return run

    def ingest_queued_stage(tmp: Path) -> Callable[[], Any]:
        def run() -> Any:
            ingest = fresh_ingest(tmp, "queued", None)
            ingest.inbox.put(None)  # the end: the loop stops once it has taken everything
            ingest._run()
            ingest._flush()
            return ingest.report()

        return run

    results: dict[str, list[float]] = {s: [] for s in STAGES}
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        runs: dict[str, Callable[[], Any]] = {
            "json_loads": lambda: [json.loads(m) for m in messages],
            "bounded_parse": lambda: [
                loads_bounded(m, max_bytes=len(m), max_depth=MAX_DOCUMENT_DEPTH) for m in messages
            ],
            "decode": lambda: [decode_message(m, 1024 * 1024) for m in messages],
            "builder": builder_stage(True),
            "live_builder": builder_stage(False),
            "features": features_stage,
            "store": store_stage(tmp),
            "ingest": ingest_stage(tmp),
            "ingest_queued": ingest_queued_stage(tmp),
        }
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            runs["ingest"]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        for _ in range(repeat):
            for stage in STAGES:
                cpu, result = _cpu(runs[stage])
                results[stage].append(1e6 * cpu / n_readings)
                if stage in ("ingest", "ingest_queued"):
                    checks[stage] = {
                        "stored_this_run": result["stored_this_run"],
                        "quality": result["quality"],
                        "live_quality": result["live"]["quality"],
                        "store": result["store"],
                    }
    return {
        "messages": len(messages),
        "readings": n_readings,
        "samples": n_samples,
        "us_per_reading": results,
        "checks": checks,
    }


def run_baseline(ref: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same stages on revision ``ref``'s sources, in a fresh interpreter."""
    with tempfile.TemporaryDirectory(prefix="fedge-bench-ingest-base-") as base:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, *_SOURCE_DIRS], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        out = Path(base) / "result.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--source-root", base]
        argv += ["--repeat", str(args.repeat), "--out", str(out)]
        if args.rows is not None:
            argv += ["--rows", str(args.rows)]
        subprocess.run(argv, check=True, cwd=ROOT)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _use_sources(source_root: str) -> None:
    """Points the editable install's finder at another checkout's sources (``--baseline``)."""
    for finder in sys.meta_path:
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", ""), None), "MAPPING", None)
        if isinstance(mapping, dict):
            for name, path in mapping.items():
                mapping[name] = path.replace(str(ROOT), source_root, 1)
            return
    sys.path[:0] = [str(Path(source_root) / d) for d in _SOURCE_DIRS]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(result: dict[str, Any]) -> str:
    """A Markdown table: per stage, median (range) of each variant."""
    variants = [v for v in ("floor", "baseline", "current") if v in result["variants"]]
    names = {"baseline": f"before ({result.get('baseline_ref')})", "current": "after (this checkout)"}
    head = "| CPU-us per reading | " + " | ".join(names.get(v, v) for v in variants if v != "floor") + " |"
    lines = [head, "|---|" + "---|" * (len(variants) - ("floor" in variants))]
    for stage in STAGES:
        cells = []
        for v in variants:
            if v == "floor":
                continue
            s = result["variants"][v]["us_per_reading"].get(stage)
            cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="rows of the subject to replay (default: all)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline", default=None, help="a git revision to compare with, in the same run")
    p.add_argument("--profile", action="store_true", help="cProfile one ingest run first (top 30)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source-root", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.source_root:
        _use_sources(a.source_root)
    if a.worker:
        raw = run_stages(a.rows, a.repeat, False)
        a.out.write_text(json.dumps(raw))
        return 0
    variants: dict[str, Any] = {}
    if a.baseline:
        print(f"baseline: {a.baseline} ...", flush=True)
        variants["baseline"] = run_baseline(a.baseline, a)
    print("current checkout ...", flush=True)
    variants["current"] = run_stages(a.rows, a.repeat, a.profile)
    for raw in variants.values():
        raw["us_per_reading"] = {s: _summary(v) for s, v in raw["us_per_reading"].items()}
    result = {
        "what": "CPU-us per reading of the EdgeX ingest stages, in-process (bench/bench_ingest.py)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "baseline_ref": a.baseline,
        "rows": a.rows,
        "repeat": a.repeat,
        "variants": variants,
    }
    if "baseline" in variants and variants["baseline"]["checks"] != variants["current"]["checks"]:
        print("WARNING: the baseline's counters differ from the current code's:", file=sys.stderr)
        print(json.dumps(variants["baseline"]["checks"]), file=sys.stderr)
        print(json.dumps(variants["current"]["checks"]), file=sys.stderr)
        result["checks_differ"] = True
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    cur = variants["current"]
    print(f"{cur['messages']} messages, {cur['readings']:,} readings, {cur['samples']} samples")
    print(table(result))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
