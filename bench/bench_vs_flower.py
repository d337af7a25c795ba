"""fedge and Flower side by side, in one run, on the same federated workload.

The workload (issue 15): the default task's real smartwatch data, subjects 1-7 as 7 devices,
subjects 8-10 held out; 48 window features (100-reading windows every 50, 8 statistics of 6
channels); the MLP 48-64-32-7 from the same seeded Glorot initial weights; SGD at the task's
learning rate and momentum (0.02, 0.9; momentum reset every round), batch 32, ONE local epoch;
feature normalisation from the devices' pooled moments (one moments round before round 1 on
both sides); the same number of rounds.

- fedge: ``fedge demo --data direct`` with a copy of ``tasks/har-watch.toml`` whose
  ``local_epochs`` is 1: a real TLS Mosquitto broker, the aggregator and 7 ``fedge agent run``
  processes (LiteRT on-device training), the deployment defaults (equal weights, norm clipping,
  robust moments, server learning rate 2.0). Held-out accuracy: the demo's observer scores every
  global model on subjects 8-10. The demo also builds the model and trains a centralised
  reference first; that start-up is not part of any number below except wall time.
- Flower (its own venv, ``make flower-env``): the deployment engine, not the simulation engine:
  one ``flower-superlink --insecure`` and one ``flower-supernode --insecure`` per device on
  loopback, the app submitted with ``flwr run``. The app is written by this script: a ServerApp
  (one query round for the moments, then ``FedAvg`` for R rounds, centralised evaluation on
  subjects 8-10 after every round) and a ClientApp training the same MLP in numpy with the
  same hand-written SGD (no model library: the comparison is about the framework). The ClientApp
  loads the subject with seglearn once and keeps the features in a cache file (a Flower
  ClientApp process does not outlive its message).

Measured for each, per device (all 7 are measured; the table shows the median device):

- round time: the time between two consecutive global models (fedge: the aggregator log's
  "round ... aggregated" lines; Flower: the ServerApp's evaluate_fn calls); median over rounds;
- peak RSS of the device's whole process tree (fedge: the agent process; Flower: the SuperNode
  and every process under it, ClientApps included), /proc sampled every 0.1 s, the sum of the
  tree's RSS at each sample, the largest sum;
- device CPU-seconds per round: utime+stime (+ reaped children's) of the same tree from
  /proc/<pid>/stat; "whole run / R" and "steady", (end of round R - end of round 1) / (R - 1);
- bytes sent up per device per round, on the wire: TCP payload bytes the device's tree sent to
  its server (fedge: the agent's TLS connection to the broker; Flower: the SuperNode's HTTP
  connections to the SuperLink), from the kernel's per-socket ``bytes_sent`` (``ss -ti``,
  sampled every 0.25 s, connections between two processes of the same tree left out); for
  Flower also counted by a TCP proxy on loopback in front of the SuperLink, one port per
  SuperNode (the two must agree);
- held-out accuracy after every round.

Usage: ``python bench/bench_vs_flower.py [--rounds 30] [--quick] [--out bench/results/vs_flower.json]
[--docs-json docs/results/vs_flower.json] [--readme README.md]`` (``make bench-vs-flower``).
``--docs-json`` writes the committed copy of the report and ``--readme`` rewrites README.md's
table between ``<!-- vs-flower:begin -->`` and ``<!-- vs-flower:end -->``
(``bench/vs_flower_report.py``, which also does both from an existing report). Without
``.venv-flower`` it prints the command that creates it and exits 2. A failed run exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from agent_processes import cmdline  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from vs_flower_report import METRICS, ReportError, publish  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "vs_flower.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"
FLOWER_VENV = ROOT / ".venv-flower"
FLOWER_ENV_COMMAND = "make flower-env   (or: bash scripts/flower-venv.sh)"
FEDGE_BIN = ROOT / ".venv" / "bin" / "fedge"
DEVICES = 7
TRAIN_SUBJECTS = tuple(range(1, DEVICES + 1))
SAMPLE_INTERVAL_S = 0.1
SOCKET_SAMPLE_EVERY = 3  # ticks between two `ss` reads (0.3 s)
MB = 1_000_000
#: One BLAS/OpenMP thread in every process of both sides: numpy's tiny matmuls must not spin
#: worker threads on a 2-core machine (that would cost Flower CPU it does not need).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: The hand-measured Flower numbers of issue 15 (2-core machine, Keras client), for reference.
ISSUE_15_FLOWER = {
    "round_s": 10.3,
    "device_rss_mb": 423.0,
    "cpu_s_per_round": 1.70,
    "bytes_up_per_round": 61_600,
    "accuracy_after_30": 0.789,
}


class BenchError(Exception):
    """The run failed: a process exited, a deadline passed, a check did not hold."""


# --- the Flower app (written to the run's directory; runs in .venv-flower) -------------------

FLOWER_TASK_PY = '''\
"""The workload in numpy: fedge's window features, its MLP, its SGD (bench_vs_flower.py)."""

from __future__ import annotations

import os

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW_SIZE = 100
WINDOW_STEP = 50
LAYERS = (48, 64, 32, 7)
TEST_SUBJECTS = (8, 9, 10)


def window_features(readings):
    """fedge.agent.features.extract_features for the har-watch task: 8 statistics of each of the
    6 channels over every complete window, resource-major."""
    arr = np.asarray(readings, dtype=np.float64)
    if arr.shape[0] < WINDOW_SIZE:
        return np.empty((0, 6 * 8), np.float32)
    n_win = 1 + (arr.shape[0] - WINDOW_SIZE) // WINDOW_STEP
    win = sliding_window_view(arr, WINDOW_SIZE, axis=0)[::WINDOW_STEP][:n_win]
    stats = [
        win.mean(axis=-1),
        win.std(axis=-1),
        win.min(axis=-1),
        win.max(axis=-1),
        np.median(win, axis=-1),
        np.sqrt(np.mean(win * win, axis=-1)),
        np.percentile(win, 10, axis=-1),
        np.percentile(win, 90, axis=-1),
    ]
    return np.stack(stats, axis=-1).reshape(n_win, -1).astype(np.float32)


def load_subjects(subjects):
    """Each subject's features and labels from seglearn's smartwatch data set."""
    from seglearn.datasets import load_watch

    data = load_watch()
    out = {}
    for s in subjects:
        xs, ys = [], []
        for x, y, subject in zip(data["X"], data["y"], data["subject"]):
            if int(subject) == s:
                f = window_features(x)
                xs.append(f)
                ys.append(np.full(f.shape[0], int(y), np.int32))
        out[s] = (np.concatenate(xs), np.concatenate(ys))
    return out


def subject_data(subject, cache_dir):
    """One subject, from the cache file once a ClientApp process has computed it."""
    path = os.path.join(cache_dir, f"subject-{subject:02d}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return z["x"], z["y"]
    x, y = load_subjects([subject])[subject]
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def initial_weights(seed):
    """fedge's initial weights: Glorot-uniform kernels, zero biases, one seeded generator."""
    rng = np.random.default_rng(seed)
    weights = []
    for n_in, n_out in zip(LAYERS[:-1], LAYERS[1:]):
        limit = np.sqrt(6.0 / (n_in + n_out))
        weights.append(rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32))
        weights.append(np.zeros(n_out, np.float32))
    return weights


def _forward(weights, x):
    activations = [x]
    h = x
    n_layers = len(weights) // 2
    for i in range(n_layers):
        z = h @ weights[2 * i] + weights[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(z, 0.0)
            activations.append(h)
        else:
            h = z
    return activations, h


def _log_softmax(out):
    shifted = out - out.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def train(weights, x, y, lr, momentum, batch_size, epochs, rng):
    """SGD with momentum (m = momentum * m + g; w -= lr * m; m starts at zero), shuffled
    mini-batches, the last partial batch included: fedge's TrainableMLP._train, in numpy."""
    weights = [np.array(w, np.float32, copy=True) for w in weights]
    slots = [np.zeros_like(w) for w in weights]
    n = x.shape[0]
    lr = np.float32(lr)
    momentum = np.float32(momentum)
    eye = np.eye(LAYERS[-1], dtype=np.float32)
    loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            activations, out = _forward(weights, xb)
            log_p = _log_softmax(out)
            onehot = eye[yb]
            k = np.float32(len(idx))
            total += float(-(onehot * log_p).sum())
            delta = (np.exp(log_p) - onehot) / k
            grads = [None] * len(weights)
            for i in reversed(range(len(weights) // 2)):
                grads[2 * i] = activations[i].T @ delta
                grads[2 * i + 1] = delta.sum(axis=0)
                if i > 0:
                    delta = (delta @ weights[2 * i].T) * (activations[i] > 0.0)
            for w, m, g in zip(weights, slots, grads):
                m *= momentum
                m += g
                w -= lr * m
        loss = total / n
    return weights, loss


def evaluate(weights, x, y):
    """Mean cross-entropy and accuracy."""
    _, out = _forward(weights, x)
    log_p = _log_softmax(out)
    loss = float(-log_p[np.arange(len(y)), y].mean())
    accuracy = float((out.argmax(axis=1) == y).mean())
    return loss, accuracy
'''

FLOWER_CLIENT_PY = '''\
"""The ClientApp: moments on query, one local epoch of numpy SGD on train."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fvf.task import subject_data, train as sgd_train

app = ClientApp()


def _data(context):
    subject = int(context.node_config["subject"])
    return subject, *subject_data(subject, str(context.node_config["cache-dir"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    _, x, _ = _data(context)
    x64 = x.astype(np.float64)
    moments = MetricRecord(
        {
            "count": int(x64.shape[0]),
            "sum": x64.sum(axis=0).tolist(),
            "sumsq": (x64 * x64).sum(axis=0).tolist(),
        }
    )
    return Message(RecordDict({"moments": moments}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    subject, x, y = _data(context)
    config = msg.content["config"]
    mean = np.asarray(config["norm-mean"], np.float32)
    std = np.asarray(config["norm-std"], np.float32)
    xn = (x - mean) / std
    server_round = int(config.get("server-round", 0))
    rng = np.random.default_rng([subject, server_round])
    weights, loss = sgd_train(
        msg.content["arrays"].to_numpy_ndarrays(),
        xn,
        y,
        float(config["lr"]),
        float(config["momentum"]),
        int(config["batch-size"]),
        int(config["local-epochs"]),
        rng,
    )
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": int(x.shape[0])})
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics}), reply_to=msg)
'''

FLOWER_SERVER_PY = '''\
"""The ServerApp: a moments query round, then FedAvg with centralised evaluation."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fvf.task import TEST_SUBJECTS, evaluate, initial_weights, load_subjects

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    log_path = str(cfg["log-path"])
    n_nodes = int(cfg["num-nodes"])

    def record(**items):
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **items}) + "\\n")

    record(event="start")
    while len(list(grid.get_node_ids())) < n_nodes:
        time.sleep(0.1)
    nodes = sorted(grid.get_node_ids())
    record(event="nodes", count=len(nodes))
    queries = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(queries, timeout=600))
    count = 0
    total = np.zeros(48)
    total_sq = np.zeros(48)
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"moments query failed: {reply.error}")
        m = reply.content["moments"]
        count += int(m["count"])
        total += np.asarray(m["sum"])
        total_sq += np.asarray(m["sumsq"])
    mean = total / count
    std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0)), 1e-6)
    record(event="moments", replies=len(replies), count=count)

    test = load_subjects(TEST_SUBJECTS)
    x_test = np.concatenate([test[s][0] for s in TEST_SUBJECTS])
    y_test = np.concatenate([test[s][1] for s in TEST_SUBJECTS])
    x_test = ((x_test - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32)

    def evaluate_fn(server_round, arrays):
        loss, accuracy = evaluate(arrays.to_numpy_ndarrays(), x_test, y_test)
        record(event="round", round=int(server_round), accuracy=accuracy, loss=loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n_nodes,
        min_available_nodes=n_nodes,
    )
    train_config = ConfigRecord(
        {
            "lr": float(cfg["learning-rate"]),
            "momentum": float(cfg["momentum"]),
            "batch-size": int(cfg["batch-size"]),
            "local-epochs": int(cfg["local-epochs"]),
            "norm-mean": mean.tolist(),
            "norm-std": std.tolist(),
        }
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_weights(int(cfg["seed"]))),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    record(event="done")
'''

FLOWER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedge-vs-flower"
version = "1.0.0"
description = "bench/bench_vs_flower.py: fedge's har-watch workload as a Flower app"
license = "Apache-2.0"
dependencies = ["flwr=={flwr}", "numpy", "seglearn==1.2.5", "pandas", "scikit-learn"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedge-bench"

[tool.flwr.app.components]
serverapp = "fvf.server_app:app"
clientapp = "fvf.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
num-nodes = {nodes}
learning-rate = {lr}
momentum = {momentum}
batch-size = {batch}
local-epochs = {epochs}
seed = {seed}
log-path = "{log_path}"
"""


def write_flower_app(
    app_dir: Path, rounds: int, training: dict[str, Any], seed: int, log_path: Path, flwr: str
) -> None:
    pkg = app_dir / "fvf"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""fedge vs Flower (bench/bench_vs_flower.py)."""\n')
    (pkg / "task.py").write_text(FLOWER_TASK_PY)
    (pkg / "client_app.py").write_text(FLOWER_CLIENT_PY)
    (pkg / "server_app.py").write_text(FLOWER_SERVER_PY)
    (app_dir / "pyproject.toml").write_text(
        FLOWER_PYPROJECT.format(
            flwr=flwr,
            rounds=rounds,
            nodes=DEVICES,
            lr=training["learning_rate"],
            momentum=training["momentum"],
            batch=training["batch_size"],
            epochs=training["local_epochs"],
            seed=seed,
            log_path=log_path,
        )
    )


# --- /proc sampling: process trees, CPU, RSS, per-socket bytes --------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcStat:
    ppid: int
    cpu_s: float  # utime + stime + cutime + cstime
    rss: int  # bytes
    start: int  # starttime, ticks since boot (tells a reused pid apart)
    self_cpu_s: float = 0.0  # utime + stime: the process alone (for the per-command breakdown)


def read_procs() -> dict[int, ProcStat]:
    procs: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): ppid 4, utime 14, stime 15, cutime 16, cstime 17, start 22, rss 24
        cpu = sum(int(v) for v in fields[11:15]) / TICK
        own = sum(int(v) for v in fields[11:13]) / TICK
        procs[int(entry.name)] = ProcStat(int(fields[1]), cpu, int(fields[21]) * PAGE, int(fields[19]), own)
    return procs


def descendants(root: int, procs: dict[int, ProcStat]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, st in procs.items():
        children.setdefault(st.ppid, []).append(pid)
    out = [root] if root in procs else []
    i = 0
    while i < len(out):
        out.extend(children.get(out[i], []))
        i += 1
    return out


_SS_SOCKET = re.compile(r"^\S+\s+\S+\s+(\S+)\s+(\S+)\s+users:\((.*)\)\s*$")
_SS_PID = re.compile(r"pid=(\d+)")
_SS_SENT = re.compile(r"\bbytes_sent:(\d+)")


def tcp_sockets() -> list[tuple[str, str, set[int], int]]:
    """Established TCP sockets: (local, peer, owning pids, bytes_sent) from ``ss -tinpH``."""
    try:
        text = subprocess.run(
            ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    out: list[tuple[str, str, set[int], int]] = []
    current: tuple[str, str, set[int]] | None = None
    for line in text.splitlines():
        if not line.startswith(("\t", " ")):
            m = _SS_SOCKET.match(line)
            current = (m.group(1), m.group(2), {int(p) for p in _SS_PID.findall(m.group(3))}) if m else None
        elif current is not None:
            sent = _SS_SENT.search(line)
            out.append((*current, int(sent.group(1)) if sent else 0))
            current = None
    return out


@dataclass
class DeviceTrace:
    root: int | None = None
    root_start: int | None = None
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)  # t, cpu_s, rss, bytes
    peak_rss: int = 0
    peak_procs: int = 0
    pids: set[int] = field(default_factory=set)
    sockets: dict[tuple[str, str], int] = field(default_factory=dict)  # (local, peer) -> bytes_sent
    # The breakdown by command (argv[0]'s name and the next two arguments): what each kind of
    # process costs, and which processes made up the tree when its RSS peaked.
    pid_key: dict[int, str] = field(default_factory=dict)
    pid_seen: dict[int, int] = field(default_factory=dict)
    pid_cpu: dict[int, float] = field(default_factory=dict)  # last seen utime + stime
    peak_composition: dict[str, list[int]] = field(default_factory=dict)  # command -> RSS each

    def bytes_sent(self) -> int:
        return sum(self.sockets.values())

    def by_command(self) -> dict[str, dict[str, Any]]:
        """Per command: processes seen, their own CPU-seconds (approximate: the last 0.1 s of a
        process that exits is not seen), and the RSS of those in the tree at its peak."""
        out: dict[str, dict[str, Any]] = {}
        for pid, key in self.pid_key.items():
            row = out.setdefault(key, {"processes": 0, "cpu_s": 0.0, "at_peak_rss_bytes": []})
            row["processes"] += 1
            row["cpu_s"] = round(row["cpu_s"] + self.pid_cpu.get(pid, 0.0), 2)
        for key, rss in self.peak_composition.items():
            out.setdefault(key, {"processes": 0, "cpu_s": 0.0, "at_peak_rss_bytes": []})
            out[key]["at_peak_rss_bytes"] = rss
        return out


class Sampler(threading.Thread):
    """Every 0.1 s: each device tree's CPU and RSS; every 0.3 s its sockets' bytes_sent."""

    def __init__(self, find_root: Callable[[str, dict[int, ProcStat]], int | None], devices: Sequence[str]):
        super().__init__(daemon=True, name="sampler")
        self.find_root = find_root
        self.traces = {d: DeviceTrace() for d in devices}
        self.stop_event = threading.Event()
        self.ticks = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.tick()
                self.stop_event.wait(SAMPLE_INTERVAL_S)
            self.tick(sockets=True)
        except Exception:  # reported by the caller, never a silent stop
            self.errors.append(traceback.format_exc())

    def tick(self, sockets: bool = False) -> None:
        now = time.time()
        procs = read_procs()
        socks = tcp_sockets() if sockets or self.ticks % SOCKET_SAMPLE_EVERY == 0 else None
        self.ticks += 1
        for device, trace in self.traces.items():
            if trace.root is None:
                trace.root = self.find_root(device, procs)
                if trace.root is None:
                    continue
                trace.root_start = procs[trace.root].start
            root = trace.root
            if root not in procs or procs[root].start != trace.root_start:
                continue  # the device has exited: its last sample stands
            tree = descendants(root, procs)
            for pid in tree:
                trace.pids.add(pid)
                seen = trace.pid_seen.get(pid, 0)
                trace.pid_seen[pid] = seen + 1
                if seen < 5:  # a fresh fork may not have exec'd yet: read its command again
                    argv = cmdline(pid)
                    key = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv[:3]) if a)
                    trace.pid_key[pid] = key or trace.pid_key.get(pid, "") or "(exited)"
                trace.pid_cpu[pid] = procs[pid].self_cpu_s
            rss = sum(procs[p].rss for p in tree)
            cpu = sum(procs[p].cpu_s for p in tree)
            if rss > trace.peak_rss:
                trace.peak_rss = rss
                trace.peak_composition = {}
                for p in tree:
                    trace.peak_composition.setdefault(trace.pid_key[p], []).append(procs[p].rss)
            trace.peak_procs = max(trace.peak_procs, len(tree))
            if socks is not None:
                members = set(tree)
                own = [s for s in socks if s[2] & members]
                local_ends = {s[0] for s in own}
                for local, peer, _, sent in own:
                    if peer in local_ends:
                        continue  # between two processes of the device (ClientApp <-> SuperNode)
                    conn = (local, peer)
                    trace.sockets[conn] = max(trace.sockets.get(conn, 0), sent)
            trace.samples.append((now, cpu, rss, trace.bytes_sent()))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=15)


def value_at(samples: list[tuple[float, float, int, int]], t: float, index: int) -> float:
    """A sampled counter at time t (linear between the samples around it)."""
    if not samples:
        return float("nan")
    if t <= samples[0][0]:
        return float(samples[0][index])
    for (t0, *v0), (t1, *v1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            a, b = float(v0[index - 1]), float(v1[index - 1])
            return a if t1 == t0 else a + (b - a) * (t - t0) / (t1 - t0)
    return float(samples[-1][index])


# --- a counting TCP proxy (Flower: one per SuperNode, in front of the SuperLink) ------------


class CountingProxy:
    """Forwards 127.0.0.1:port to a target and counts the bytes each way, over all connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = 0
        self.down = 0
        self.connections = 0
        self.lock = threading.Lock()
        self.closed = False
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self.socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass  # a side closed: the connection is over
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.socks:
                s.close()


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


class Processes:
    """Everything this run starts; ``stop`` ends each of them and every process under them."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
    ) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            p = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        self.procs.append((name, p))
        return p.pid

    def stop(self, timeout: float = 10.0) -> None:
        procs = read_procs()
        tree: dict[int, int] = {}  # pid -> start time, every process under ours
        for _, p in self.procs:
            for pid in descendants(p.pid, procs):
                tree[pid] = procs[pid].start
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        until = time.monotonic() + timeout
        for _, p in self.procs:
            try:
                p.wait(max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        now = read_procs()
        for pid, start in tree.items():
            if pid in now and now[pid].start == start:  # still the process we started
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def check_alive(self, names: Sequence[str]) -> None:
        for name, p in self.procs:
            if name in names and p.poll() is not None:
                raise BenchError(f"{name} exited with code {p.returncode}")


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "VIRTUAL_ENV"))}
    env.update(THREAD_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# --- one side's results ---------------------------------------------------------------------


@dataclass
class Side:
    name: str
    rounds: int
    round_ends: list[float]  # end of round 0 (start of round 1), end of round 1, ... R
    accuracy: list[float]  # after round 1..R
    traces: dict[str, DeviceTrace]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def device_summary(self, trace: DeviceTrace) -> dict[str, Any]:
        r = self.rounds
        t1, tr = self.round_ends[1], self.round_ends[r]
        samples = trace.samples
        cpu_total = samples[-1][1] if samples else float("nan")
        bytes_total = trace.bytes_sent()
        steady_cpu = steady_bytes = None
        if r >= 2:
            steady_cpu = (value_at(samples, tr, 1) - value_at(samples, t1, 1)) / (r - 1)
            steady_bytes = (value_at(samples, tr, 3) - value_at(samples, t1, 3)) / (r - 1)
        return {
            "peak_rss_bytes": trace.peak_rss,
            "peak_processes": trace.peak_procs,
            "processes_seen": len(trace.pids),
            "commands": trace.by_command(),
            "cpu_s_total": cpu_total,
            "cpu_s_per_round": cpu_total / r,
            "cpu_s_per_round_steady": steady_cpu,
            "bytes_up_total": bytes_total,
            "bytes_up_per_round": bytes_total / r,
            "bytes_up_per_round_steady": steady_bytes,
            "connections": len(trace.sockets),
            "samples": len(samples),
        }

    def summary(self) -> dict[str, Any]:
        durations = [b - a for a, b in zip(self.round_ends, self.round_ends[1:], strict=False)]
        devices = {d: self.device_summary(t) for d, t in self.traces.items()}

        def med(key: str) -> float | None:
            values = [v[key] for v in devices.values() if v[key] is not None]
            return statistics.median(values) if values else None

        return {
            "rounds": self.rounds,
            "wall_s": self.wall_s,
            "round_s_median": statistics.median(durations),
            "round_s": durations,
            "accuracy": self.accuracy,
            "final_accuracy": self.accuracy[-1],
            "device_peak_rss_bytes": med("peak_rss_bytes"),
            "device_peak_rss_bytes_max": max(v["peak_rss_bytes"] for v in devices.values()),
            "device_cpu_s_per_round": med("cpu_s_per_round"),
            "device_cpu_s_per_round_steady": med("cpu_s_per_round_steady"),
            "device_bytes_up_per_round": med("bytes_up_per_round"),
            "device_bytes_up_per_round_steady": med("bytes_up_per_round_steady"),
            "devices": devices,
            **self.extra,
        }


# --- fedge ---------------------------------------------------------------------------------

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_PUBLISHED = re.compile(r"published manifest v\d+: train round r(\d+)-v\d+")
_AGGREGATED = re.compile(r"round r(\d+)-v\d+ aggregated")


def _log_time(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000


def fedge_round_ends(log: Path, rounds: int) -> list[float]:
    """Round 1's manifest, then each train round's aggregation (the last one of a retried round)."""
    first: float | None = None
    ends: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        t = _log_time(line)
        if t is None:
            continue
        if (m := _PUBLISHED.search(line)) and int(m.group(1)) == 1 and first is None:
            first = t
        elif m := _AGGREGATED.search(line):
            ends[int(m.group(1))] = t
    missing = [r for r in range(1, rounds + 1) if r not in ends]
    if first is None or missing:
        raise BenchError(f"fedge: the aggregator log {log} lacks round 1's manifest or rounds {missing}")
    return [first, *(ends[r] for r in range(1, rounds + 1))]


def one_epoch_task(src: Path, dst: Path) -> dict[str, Any]:
    """The task spec with local_epochs = 1 (the workload's one local epoch); its [training]."""
    import tomllib

    text = src.read_text()
    new, n = re.subn(r"(?m)^local_epochs\s*=\s*\d+", "local_epochs = 1", text)
    if n != 1:
        raise BenchError(f"{src}: no single local_epochs line to set to 1")
    dst.write_text(new)
    spec = tomllib.loads(new)
    training: dict[str, Any] = spec["training"]
    if training.get("optimizer") != "sgd" or spec["model"]["hidden"] != [64, 32]:
        raise BenchError(f"{src}: the comparison's Flower side is an SGD MLP 48-64-32-7")
    return training


def run_fedge(work: Path, task: Path, rounds: int, timeout_s: float) -> Side:
    out = work / "fedge"
    procs = Processes()
    argv = [
        str(FEDGE_BIN),
        "demo",
        "--task",
        str(task),
        "--data",
        "direct",
        "--devices",
        str(DEVICES),
        "--rounds",
        str(rounds),
        "--json",
        "--no-progress",
        "--out",
        str(out),
    ]
    start = time.time()
    demo_pid = procs.start("fedge demo", argv, work / "fedge-demo.log", base_env(), cwd=ROOT)
    # The demo's stdout is its JSON summary: read it from the log's last line.

    def find_agent(device: str, table: dict[int, ProcStat]) -> int | None:
        for pid in descendants(demo_pid, table):
            argv = cmdline(pid)
            if "agent" in argv and "run" in argv and any(a.endswith(f"agent-{device}.toml") for a in argv):
                return pid
        return None

    devices = [f"watch-{s:02d}" for s in TRAIN_SUBJECTS]
    sampler = Sampler(find_agent, devices)
    sampler.start()
    try:
        demo = procs.procs[0][1]
        try:
            demo.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"fedge demo did not finish in {timeout_s:.0f} s; see {out}/logs") from None
    finally:
        sampler.stop()
        procs.stop()
    wall = time.time() - start
    if sampler.errors:
        raise BenchError("the /proc sampler failed:\n" + "\n".join(sampler.errors))
    if demo.returncode != 0:
        raise BenchError(f"fedge demo exited with {demo.returncode}; see {work / 'fedge-demo.log'}")
    summary = None
    for line in reversed((work / "fedge-demo.log").read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    if summary is None or summary.get("rounds_completed") != rounds:
        raise BenchError(f"fedge demo gave no summary of {rounds} rounds; see {work / 'fedge-demo.log'}")
    accuracy = [float(r["test_accuracy"]) for r in summary["per_round"]]
    ends = fedge_round_ends(out / "logs" / "aggregator.log", rounds)
    missing = [d for d, t in sampler.traces.items() if not t.samples]
    if missing:
        raise BenchError(f"fedge: no samples of the agents {missing}")
    return Side(
        "fedge",
        rounds,
        ends,
        accuracy,
        sampler.traces,
        wall,
        extra={
            "centralized_accuracy": summary.get("centralized_accuracy"),
            "mean_update_bytes_sealed": summary.get("mean_update_bytes"),
            "broker": summary.get("broker"),
            "demo_seconds": summary.get("seconds"),
        },
    )


# --- Flower --------------------------------------------------------------------------------


def flower_version() -> str | None:
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        return None
    res = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('flwr'))"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return res.stdout.strip() or None if res.returncode == 0 else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return out


def run_flower(
    work: Path, rounds: int, training: dict[str, Any], seed: int, flwr: str, timeout_s: float
) -> Side:
    base = work / "flower"
    app_dir = base / "app"
    log_path = base / "server-rounds.jsonl"
    write_flower_app(app_dir, rounds, training, seed, log_path, flwr)
    bin_dir = FLOWER_VENV / "bin"
    path_env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    link_port = free_port()
    procs = Processes()
    proxies = [CountingProxy(link_port) for _ in TRAIN_SUBJECTS]
    node_pids: dict[str, int] = {}
    start = time.time()
    sampler: Sampler | None = None
    try:
        procs.start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
            base / "logs" / "superlink.log",
            base_env({**path_env, "FLWR_HOME": str(base / "home-superlink")}),
            cwd=base,
        )
        _wait_port(link_port, 60, procs, "superlink")
        for subject, proxy in zip(TRAIN_SUBJECTS, proxies, strict=True):
            device = f"watch-{subject:02d}"
            node_config = f'subject={subject} cache-dir="{base / "cache" / device}"'
            node_pids[device] = procs.start(
                device,
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{proxy.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],
                base / "logs" / f"{device}.log",
                base_env({**path_env, "FLWR_HOME": str(base / f"home-{device}")}),
                cwd=base,
            )
        sampler = Sampler(lambda device, _table: node_pids.get(device), list(node_pids))
        sampler.start()
        cli_home = base / "home-cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "bench"\n\n'
            f'[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        cli_env = base_env({**path_env, "FLWR_HOME": str(cli_home)})
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app_dir), "bench", "--format", "json"],
            capture_output=True,
            text=True,
            env=cli_env,
            cwd=base,
            timeout=180,
            check=False,
        )
        (base / "logs" / "flwr-run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise BenchError(f"flwr run failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
        deadline = time.monotonic() + timeout_s
        while True:
            events = _read_jsonl(log_path)
            if any(e.get("event") == "done" for e in events):
                break
            procs.check_alive(["superlink", *node_pids])
            if time.monotonic() > deadline:
                raise BenchError(
                    f"Flower did not finish {rounds} rounds in {timeout_s:.0f} s; see {base / 'logs'}"
                )
            time.sleep(0.5)
        time.sleep(1.0)  # the last replies' acknowledgements on the wire
    finally:
        if sampler is not None:
            sampler.stop()
        procs.stop()
        for proxy in proxies:
            proxy.close()
    wall = time.time() - start
    assert sampler is not None
    if sampler.errors:
        raise BenchError("the /proc sampler failed:\n" + "\n".join(sampler.errors))
    events = _read_jsonl(log_path)
    by_round = {int(e["round"]): e for e in events if e.get("event") == "round"}
    missing = [r for r in range(rounds + 1) if r not in by_round]
    if missing:
        raise BenchError(f"Flower: the ServerApp recorded no evaluation after rounds {missing}")
    ends = [float(by_round[r]["time"]) for r in range(rounds + 1)]
    accuracy = [float(by_round[r]["accuracy"]) for r in range(1, rounds + 1)]
    proxy_counts = {
        f"watch-{s:02d}": {"up": p.up, "down": p.down, "connections": p.connections}
        for s, p in zip(TRAIN_SUBJECTS, proxies, strict=True)
    }
    return Side(
        "flower",
        rounds,
        ends,
        accuracy,
        sampler.traces,
        wall,
        extra={
            "initial_accuracy": float(by_round[0]["accuracy"]),
            "proxy_bytes": proxy_counts,
            "device_bytes_up_per_round_proxy": statistics.median(v["up"] for v in proxy_counts.values())
            / rounds,
        },
    )


def _wait_port(port: int, timeout: float, procs: Processes, name: str) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        procs.check_alive([name])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise BenchError(f"{name} did not listen on port {port} within {timeout:.0f} s")


# --- checks, report --------------------------------------------------------------------------


def check_same_features(flower_task_source: str) -> dict[str, Any]:
    """The Flower side's numpy features equal fedge's own, subject by subject (same windows)."""
    import numpy as np

    from fedge.lab import har_watch
    from fedge.protocol.task import parse_task_spec

    namespace: dict[str, Any] = {"__name__": "fvf_task"}
    exec(compile(flower_task_source, "fvf/task.py", "exec"), namespace)  # our own source, above
    task = parse_task_spec(DEFAULT_TASK.read_text())
    ours = har_watch.load_devices(task)
    theirs = namespace["load_subjects"](list(ours))
    counts = {}
    for s, dev in ours.items():
        x, y = theirs[s]
        if x.shape != dev.x.shape or not np.array_equal(y, dev.y) or not np.allclose(x, dev.x, atol=1e-5):
            raise BenchError(f"subject {s}: the Flower app's features differ from fedge's")
        counts[s] = int(x.shape[0])
    from fedge.aggregator.trainable_mlp import initial_weights

    flat = np.concatenate([w.ravel() for w in namespace["initial_weights"](task.model.seed)])
    if not np.array_equal(flat, initial_weights(task)):
        raise BenchError("the Flower app's initial weights differ from fedge's")
    return {
        "windows_per_subject": counts,
        "parameters": int(flat.size),
        "model_bytes_fp32": int(flat.size) * 4,
    }


#: The compared metrics (vs_flower_report.METRICS, the README table's rows): key, label, better.
RATIO_KEYS = tuple((key, label, better) for key, label, _, better in METRICS)


def ratios(fedge: dict[str, Any], flower: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, _, _ in RATIO_KEYS:
        a, b = fedge.get(key), flower.get(key)
        out[key] = a / b if a is not None and b else None
    return out


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if "rss" in key:
        return f"{v / MB:.1f} MB"
    if "bytes" in key:
        return f"{v / 1000:.1f} KB"
    if "accuracy" in key:
        return f"{v:.3f}"
    if "cpu" in key:
        return f"{v:.3f} s"
    return f"{v:.3f} s"


def render_table(report: dict[str, Any]) -> str:
    fe, fl, rt = report["fedge"], report["flower"], report["ratios"]
    rows = [("", "fedge", f"Flower {report['versions']['flwr']}", "fedge/Flower")]
    for key, label, better in RATIO_KEYS:
        ratio = rt.get(key)
        rows.append(
            (label, _fmt(key, fe.get(key)), _fmt(key, fl.get(key)), f"{ratio:.3f}x" if ratio else "-")
        )
        _ = better
    rows.append(
        ("bytes up (Flower, TCP proxy)", "", _fmt("bytes", fl.get("device_bytes_up_per_round_proxy")), "")
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    acc = ["round  fedge  Flower"]
    for i, (a, b) in enumerate(zip(fe["accuracy"], fl["accuracy"], strict=True), start=1):
        acc.append(f"{i:>5}  {a:.3f}  {b:.3f}")
    return "\n".join(lines) + "\n\nheld-out accuracy (subjects 8-10) after each round:\n" + "\n".join(acc)


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fe, fl = report["fedge"], report["flower"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    rounds = range(1, len(fe["accuracy"]) + 1)
    left.plot(rounds, fe["accuracy"], marker="o", markersize=3, label="fedge", color="tab:blue")
    left.plot(
        rounds,
        fl["accuracy"],
        marker="s",
        markersize=3,
        label=f"Flower {report['versions']['flwr']}",
        color="tab:orange",
    )
    if fe.get("centralized_accuracy"):
        left.axhline(fe["centralized_accuracy"], color="gray", linestyle=":", label="centralised (20 epochs)")
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy (subjects 8-10)")
    left.set_title("same data, model, SGD, 1 local epoch, 7 devices")
    left.grid(alpha=0.3)
    left.legend()
    labels, values = [], []
    names = {
        "round_s_median": "round time",
        "device_peak_rss_bytes": "device RSS",
        "device_cpu_s_per_round": "device CPU/round",
        "device_bytes_up_per_round": "bytes up/round",
        "final_accuracy": "final accuracy",
    }
    for key, name in names.items():
        v = report["ratios"].get(key)
        if v:
            labels.append(name)
            values.append(v)
    bars = right.bar(labels, values, color=["tab:green" if v < 1 else "tab:red" for v in values])
    bars[-1].set_color("tab:blue")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_yscale("log")
    right.set_ylabel("fedge / Flower (log scale; < 1: fedge uses less)")
    right.set_title("ratios, median device")
    for bar, v in zip(bars, values, strict=True):
        right.annotate(
            f"{v:.3g}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9
        )
    right.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    rounds: int
    out: Path
    work: Path
    seed: int
    docs_json: Path | None
    readme: Path | None


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=30, help="federated rounds on both sides (default 30)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "vs-flower", help="logs and run files")
    p.add_argument("--seed", type=int, default=0, help="the model's seed (fedge's task: 0)")
    p.add_argument(
        "--docs-json",
        type=Path,
        help="also write the report here: the committed copy the README's table comes from "
        "(docs/results/vs_flower.json)",
    )
    p.add_argument(
        "--readme",
        type=Path,
        help="rewrite the table between <!-- vs-flower:begin --> and <!-- vs-flower:end --> in this file",
    )
    a = p.parse_args(argv)
    rounds = 3 if a.quick else a.rounds
    if rounds < 2:
        p.error("--rounds must be at least 2")
    return Config(rounds, a.out, a.work, a.seed, a.docs_json, a.readme)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    flwr = flower_version()
    if flwr is None:
        print(
            f"bench_vs_flower: Flower's venv {FLOWER_VENV} is missing or broken; create it with:\n"
            f"    {FLOWER_ENV_COMMAND}",
            file=sys.stderr,
        )
        return 2
    if not FEDGE_BIN.exists():
        print(f"bench_vs_flower: {FEDGE_BIN} is missing; run: make install", file=sys.stderr)
        return 2
    try:
        import shutil

        shutil.rmtree(cfg.work, ignore_errors=True)
        cfg.work.mkdir(parents=True)
        task = cfg.work / "har-watch-1-epoch.toml"
        training = one_epoch_task(DEFAULT_TASK, task)
        print(
            f"checking that both sides see the same data and initial model ({cfg.rounds} rounds) ...",
            flush=True,
        )
        same = check_same_features(FLOWER_TASK_PY)
        timeout = 300.0 + cfg.rounds * 60.0
        print("fedge: fedge demo --data direct ...", flush=True)
        load = {"fedge_start": os.getloadavg()}
        fedge = run_fedge(cfg.work, task, cfg.rounds, timeout)
        load["fedge_end"] = load["flower_start"] = os.getloadavg()
        print(f"fedge: {fedge.wall_s:.1f} s; Flower {flwr}: SuperLink + {DEVICES} SuperNodes ...", flush=True)
        flower = run_flower(cfg.work, cfg.rounds, training, cfg.seed, flwr, timeout)
        load["flower_end"] = os.getloadavg()
        print(f"Flower: {flower.wall_s:.1f} s", flush=True)
    except BenchError as exc:
        print(f"bench_vs_flower: {exc}", file=sys.stderr)
        return 1
    fe, fl = fedge.summary(), flower.summary()
    report = {
        "benchmark": "bench_vs_flower",
        "machine": {
            **machine_info(),
            # 1/5/15-minute load averages around each side: other work on the machine shows here.
            "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()},
        },
        "versions": {"flwr": flwr},
        "workload": {
            "task": "tasks/har-watch.toml with local_epochs = 1",
            "devices": DEVICES,
            "train_subjects": list(TRAIN_SUBJECTS),
            "test_subjects": [8, 9, 10],
            "rounds": cfg.rounds,
            "model": "MLP 48-64-32-7",
            "training": training,
            **same,
        },
        "method": {
            "round_time": "time between consecutive global models "
            "(fedge: aggregator log; Flower: evaluate_fn)",
            "rss": "sum of VmRSS over the device's process tree, /proc sampled every 0.1 s, the peak",
            "cpu": "utime+stime+cutime+cstime over the device's process tree (/proc/<pid>/stat)",
            "bytes_up": "kernel per-socket bytes_sent (ss -ti, every 0.3 s) of the tree's connections to its "
            "server; Flower also via a counting TCP proxy per SuperNode",
            "steady": "(value at end of round R - value at end of round 1) / (R - 1)",
            "threads": THREAD_ENV,
        },
        "fedge": fe,
        "flower": fl,
        "ratios": ratios(fe, fl),
        "issue_15_flower_by_hand": ISSUE_15_FLOWER,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2) + "\n")
    png = cfg.out.with_suffix(".png")
    plot(png, report)
    print(render_table(report))
    print(f"\nwrote {cfg.out} and {png}")
    if cfg.docs_json is not None or cfg.readme is not None:
        try:
            publish(report, cfg.docs_json, cfg.readme)
        except (OSError, ReportError) as exc:
            print(f"bench_vs_flower: {exc}", file=sys.stderr)
            return 1
        print("wrote " + " and ".join(str(p) for p in (cfg.docs_json, cfg.readme) if p is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
