"""Issue 12, "the first hour": errors a new user met, as ``fedge`` reports them now.

Real subprocesses, real configs (``create_fleet``, as ``fedge demo`` writes them), real exit
codes: a missing ``ca_file`` and a ``state_dir`` the service cannot write are one
``fedge: error:`` line and exit 78 (EX_CONFIG: systemd does not restart into the same
failure), never a traceback; an agent whose broker does not answer says so on stderr, with
what to check.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedge.lab.broker import free_loopback_port
from fedge.lab.provision import FleetFiles, create_fleet
from support.cli import fedge

REPO = Path(__file__).resolve().parents[2]
EX_CONFIG = 78
DEVICE = "watch-01"


def fleet(root: Path, model_dir: Path, broker: str, **mqtt: object) -> FleetFiles:
    extra = {DEVICE: dict(mqtt), "aggregator": dict(mqtt)} if mqtt else None
    return create_fleet(root, "demo", model_dir, broker, {DEVICE: 1}, {"min_devices": 1}, mqtt_extra=extra)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 78, and stderr is exactly the one error line: no traceback, no log lines."""
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert proc.stderr.splitlines() == [f"fedge: error: {message}"], proc.stderr
    assert proc.stdout == ""


CA_FIX = (
    "set ca_file to the CA certificate that signed the broker's certificate "
    "(credentials/ca.crt of fedge broker config)"
)


def test_an_agent_with_a_missing_ca_file_is_one_line_and_exit_78(tmp_path: Path) -> None:
    files = fleet(tmp_path, tmp_path / "model", "mqtts://127.0.0.1:8883", ca_file="ca.crt")
    proc = fedge("agent", "run", "--config", str(files.agent_configs[DEVICE]))
    assert_one_line_error(
        proc,
        f"cannot read ca_file {tmp_path / 'ca.crt'} (for mqtts://127.0.0.1:8883): "
        f"No such file or directory; {CA_FIX}",
    )


def test_an_agent_whose_state_dir_cannot_be_written_is_one_line_and_exit_78(tmp_path: Path) -> None:
    # Tests run as root, who writes through any mode bits: a state_dir below a regular file
    # cannot be created by anyone.
    (tmp_path / "state").write_text("a file where the state directory should be\n")
    files = fleet(tmp_path, tmp_path / "model", "mqtt://127.0.0.1:1")
    state_dir = tmp_path / "state" / DEVICE
    proc = fedge("agent", "run", "--config", str(files.agent_configs[DEVICE]))
    assert_one_line_error(
        proc,
        f"cannot write [agent] state_dir {state_dir}: Not a directory; it must be a directory the agent "
        "can write: in Docker the agent runs as uid 10001, so give it the host directory mounted at "
        "the state_dir (sudo chown -R 10001:10001 HOST_DIR); under systemd, StateDirectory= does it",
    )


def test_an_aggregator_with_a_missing_ca_file_or_an_unwritable_state_dir_exits_78(
    tmp_path: Path, har_model_dir: Path
) -> None:
    files = fleet(tmp_path / "ca", har_model_dir, "mqtts://127.0.0.1:8883", ca_file="ca.crt")
    proc = fedge("aggregator", "run", "--config", str(files.aggregator_config))
    missing = tmp_path / "ca" / "ca.crt"
    assert_one_line_error(
        proc,
        f"cannot read ca_file {missing} (for mqtts://127.0.0.1:8883): No such file or directory; {CA_FIX}",
    )

    files = fleet(tmp_path / "state", har_model_dir, "mqtt://127.0.0.1:1")
    text = files.aggregator_config.read_text()
    state_dir = tmp_path / "state" / "blocker" / "aggregator"
    (tmp_path / "state" / "blocker").write_text("a file\n")
    files.aggregator_config.write_text(
        "\n".join(
            f'state_dir = "{state_dir}"' if line.startswith("state_dir") else line
            for line in text.splitlines()
        )
        + "\n"
    )
    proc = fedge("aggregator", "run", "--config", str(files.aggregator_config))
    assert_one_line_error(
        proc,
        f"cannot write [aggregator] state_dir {state_dir}: Not a directory; it must be a directory the "
        "aggregator can write: its image runs as uid 10001, so give it the volume "
        "(sudo chown -R 10001:10001 HOST_DIR; on Kubernetes, fsGroup: 10001)",
    )


def test_an_agent_whose_broker_does_not_answer_says_so_with_what_to_check(tmp_path: Path) -> None:
    port = free_loopback_port()  # nothing listens there
    files = fleet(tmp_path, tmp_path / "model", f"mqtt://127.0.0.1:{port}")
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(files.agent_configs[DEVICE])],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    expected = f"cannot connect to the broker at 127.0.0.1:{port}: [Errno 111] Connection refused; check: "
    try:
        deadline = time.monotonic() + 120  # an agent starting on a loaded 2-core machine
        while expected not in log.read_text() and time.monotonic() < deadline:
            assert agent.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert expected in text, text
        assert "is the broker running, and are host and port right?" in text
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=30)
    # One line per outage so far (the next one is due a minute later), not one per retry.
    assert log.read_text().count("cannot connect to the broker") == 1


# --- fedge demo: options checked before anything starts, defaults in --help, progress in logs ---


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--rounds", "-1", "must be a whole number of rounds from 1 to 1000000, not -1"),
        ("--rounds", "0", "must be a whole number of rounds from 1 to 1000000, not 0"),
        ("--rounds", "2.5", "must be a whole number of rounds from 1 to 1000000, not '2.5'"),
        ("--round-timeout", "0", "must be a number of seconds from 0.1 to 604800, not 0"),
        ("--round-timeout", "nan", "must be a number of seconds from 0.1 to 604800, not nan"),
        ("--server-lr", "-2", "must be a number from 0.000001 to 100, not -2"),
        ("--server-lr", "inf", "must be a number from 0.000001 to 100, not inf"),
        ("--min-devices", "0", "must be a whole number >= 1, not 0"),
        ("--container-agents", "-1", "must be a whole number >= 0, not -1"),
        ("--aggregation", "later", "invalid choice: 'later' (choose from 'sync', 'async')"),
    ],
)
def test_demo_options_are_checked_before_anything_starts(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    out = tmp_path / "demo"
    started = time.monotonic()
    proc = fedge("demo", "--out", str(out), option, value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"fedge demo: error: argument {option}: {message}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # The demo's first act is to create its output directory, before it starts a broker.
    assert not out.exists()
    assert time.monotonic() - started < 60  # an interpreter start, not a broker and a fleet


def test_help_shows_the_defaults() -> None:
    demo = fedge("demo", "--help")
    assert demo.returncode == 0
    text = " ".join(demo.stdout.split())  # argparse wraps lines
    assert "--rounds ROUNDS federated rounds (default: 20)" in text
    assert "--round-timeout ROUND_TIMEOUT round deadline in seconds (default: 60.0)" in text
    assert (
        "--server-lr SERVER_LR server learning rate (default: 2.0 for the smartwatch data, 1.0 with --train "
        "or --aggregation async)" in text
    )
    assert "(default: None)" not in text and "(default: False)" not in text
    simulate = " ".join(fedge("edgex", "simulate", "--help").stdout.split())
    assert "--speed SPEED 0 = as fast as possible, 1 = real time, 10 = 10x (default: 0.0)" in simulate
    tap = " ".join(fedge("edgex", "tap", "--help").stdout.split())
    assert "--prefix PREFIX EdgeX topic prefix (default: edgex)" in tap


def test_demo_progress_off_a_terminal_is_one_line_per_round() -> None:
    from fedge.cli import _demo_progress
    from fedge.lab.observer import FleetView, ModelEvaluation

    stream = io.StringIO()  # not a terminal, as stderr under CI, nohup or docker logs
    assert not stream.isatty()
    show = _demo_progress(3, enabled=True, stream=stream)
    view = FleetView()
    observer = SimpleNamespace(view=view)
    show(observer)  # nothing evaluated yet
    view.evaluations.append(ModelEvaluation(1, 0, "moments", 2.0, 0.14))  # the initial model
    show(observer)
    assert stream.getvalue() == ""
    view.evaluations.append(ModelEvaluation(2, 1, "train", 1.2, 0.5))
    show(observer)
    show(observer)  # called every half second: no new round, no new line
    view.evaluations.append(ModelEvaluation(4, 3, "final", 0.6, 0.8125))  # round 2 unseen in between
    show(observer)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"fedge demo: round 1/3 done, held-out accuracy 0\.500, \d+\.\ds elapsed", lines[0])
    assert re.fullmatch(r"fedge demo: round 3/3 done, held-out accuracy 0\.812, \d+\.\ds elapsed", lines[1])
    assert "\r" not in stream.getvalue()  # no bar redrawn in place

    quiet = io.StringIO()
    _demo_progress(3, enabled=False, stream=quiet)(observer)  # --no-progress, --json
    assert quiet.getvalue() == ""


def test_step_lines_report_the_elapsed_time() -> None:
    from fedge.lab.progress import StepLines

    now = [100.0]
    stream = io.StringIO()
    lines = StepLines("fedge demo", "round", stream, clock=lambda: now[0])
    now[0] = 112.34
    lines(1, 20, "held-out accuracy 0.700")
    now[0] = 130.0
    lines(1, 20, "held-out accuracy 0.700")
    lines(2, 20)
    assert stream.getvalue() == (
        "fedge demo: round 1/20 done, held-out accuracy 0.700, 12.3s elapsed\n"
        "fedge demo: round 2/20 done, 30.0s elapsed\n"
    )


def test_an_async_demo_with_secure_aggregation_is_refused_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = fedge("demo", "--out", str(out), "--aggregation", "async", "--secure-aggregation")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "fedge: error: --aggregation async cannot run with --secure-aggregation: use --aggregation sync "
        "(docs/async.md)"
    )
    assert not out.exists()
