"""Write-back to EdgeX through core-command (``[[insight.writeback]]``; ``fedge.agent.writeback``,
``fedge.agent.edgex.core_command``; docs/edgex.md, "Write-back (core-command)").

The pure rule logic with its exact reasons; then the real HTTP client and the rules' thread
against a fake core-command (stdlib ``http.server``) that validates every request it receives
and every answer it gives against core-command's OpenAPI spec (EdgeX 3.1.1 and 4.0.2), and
answers as the spec says: 200 ``BaseResponse``, or an ``ErrorResponse`` with 404, 423, 500.
Failures (a 500, a timeout) are counted and never stop anything.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.config import WritebackRule, _writeback_rules, load_agent_config
from fedge.agent.edgex.core_command import CoreCommandClient, CoreCommandError
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.agent.writeback import SKIP_REASONS, Writeback, WritebackPolicy, evaluate
from fedge.lab.provision import create_fleet
from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.task import TaskSpec
from support.openapi_specs import SPEC_VERSIONS, SpecMismatch, load_spec, validate_request, validate_response

NOW = 1_700_000_000.0
OCCUPIED = WritebackRule(
    "hvac-1", "setpoint", (("setpoint", "21.5"),), when_label="occupied", min_interval_s=300.0
)
HIGH_CO2 = WritebackRule("ahu-1", "fan", (("fanSpeed", "high"),), when_above=800.0, when_below=5000.0)


def insight(label: str | None = None, value: float | None = None, end: float = NOW) -> dict[str, Any]:
    """The parts of an ``fedge.insight/1`` payload the rules read."""
    if label is not None:
        prediction: dict[str, Any] = {
            "label": label,
            "class_index": 0,
            "probabilities": {"occupied": 0.5, "empty": 0.5},
        }
    else:
        prediction = {"value": value, "units": "ppm"}
    return {"schema": "fedge.insight/1", "window": {"start": end - 2, "end": end}, "prediction": prediction}


# --- the pure logic -------------------------------------------------------------------------------


def test_conditions_and_the_reasons_a_rule_cannot_be_judged() -> None:
    assert evaluate(OCCUPIED, insight("occupied")) is True
    assert evaluate(OCCUPIED, insight("empty")) is False
    assert evaluate(OCCUPIED, insight(value=3.0)) == "kind_mismatch"
    assert evaluate(HIGH_CO2, insight("occupied")) == "kind_mismatch"
    assert (
        evaluate(WritebackRule("d", "c", (("r", "1"),), when_label="absent"), insight("empty"))
        == "unknown_label"
    )
    assert [evaluate(HIGH_CO2, insight(value=v)) for v in (800.0, 800.5, 4999.0, 5000.0)] == [
        False,
        True,
        True,
        False,
    ]


class Run:
    """Drives a policy the way :class:`Writeback` does, with instant requests."""

    def __init__(self, rules: tuple[WritebackRule, ...], stale_after_s: float = 900.0) -> None:
        self.policy = WritebackPolicy(rules, stale_after_s)

    def publish(self, doc: dict[str, Any], now: float) -> list[str]:
        return self._do(*self.policy.published(doc, now), now)

    def due(self, now: float) -> list[str]:
        return self._do(*self.policy.due(now), now)

    def _do(self, fire: list[int], skips: list[tuple[int, str]], now: float) -> list[str]:
        for _, reason in skips:
            self.policy.skip(reason)
        for index in fire:
            self.policy.started(index, now)
        return [reason for _, reason in skips] + ["fire"] * len(fire)


def test_a_rule_writes_once_per_episode_and_a_held_back_write_follows_after_the_interval() -> None:
    run = Run((OCCUPIED,))
    assert run.publish(insight("occupied"), NOW) == ["fire"]
    run.policy.finished(0, None)
    assert run.publish(insight("occupied"), NOW + 60) == ["already_sent"]  # still holds: no news
    assert run.publish(insight("empty"), NOW + 120) == ["not_matched"]  # the episode ends
    # A new episode within the interval: held back, then written once the interval has passed.
    assert run.publish(insight("occupied"), NOW + 180) == ["rate_limited"]
    assert run.due(NOW + 299) == []
    assert run.due(NOW + 300) == ["fire"]
    run.policy.finished(0, None)
    assert run.due(NOW + 900) == []  # written: nothing pending
    assert run.publish(insight("occupied"), NOW + 960) == ["already_sent"]
    assert run.policy.report() == {
        "sent": 2,
        "skipped": {"already_sent": 2, "not_matched": 1, "rate_limited": 1},
        "failed": {},
    }


def test_next_due_is_when_a_pending_write_fires_and_nothing_while_none_is_pending() -> None:
    """The agent's worker sleeps until ``next_due`` (no polling): it must be the time ``due``
    fires, and None while nothing is pending (a request in flight ends with a kick instead)."""
    run = Run((OCCUPIED,))
    assert run.policy.next_due() is None
    assert run.publish(insight("occupied"), NOW) == ["fire"]
    assert run.policy.next_due() is None  # in flight
    run.policy.finished(0, "server_error")  # pending again: retried after the interval
    assert run.policy.next_due() == NOW + 300
    assert run.due(NOW + 300) == ["fire"]
    run.policy.finished(0, None)
    assert run.policy.next_due() is None  # written


def test_a_pending_write_is_dropped_when_its_episode_ends_first() -> None:
    run = Run((OCCUPIED,))
    run.publish(insight("occupied"), NOW)
    run.policy.finished(0, None)
    run.publish(insight("empty"), NOW + 10)
    assert run.publish(insight("occupied"), NOW + 20) == ["rate_limited"]
    assert run.publish(insight("empty"), NOW + 30) == ["not_matched"]
    assert run.due(NOW + 400) == []  # the condition no longer holds: nothing to write


def test_a_failed_write_is_retried_once_per_interval_until_its_prediction_is_stale() -> None:
    run = Run((OCCUPIED,), stale_after_s=900.0)
    assert run.publish(insight("occupied", end=NOW), NOW) == ["fire"]
    assert run.publish(insight("occupied", end=NOW + 5), NOW + 5) == ["busy"]  # still in flight
    run.policy.finished(0, "server_error")
    assert run.due(NOW + 299) == []
    assert run.due(NOW + 300) == ["fire"]
    run.policy.finished(0, "timeout")
    assert run.due(NOW + 600) == ["fire"]
    run.policy.finished(0, "server_error")
    assert run.due(NOW + 906) == ["stale"]  # the newest prediction's window ended > 900 s ago
    assert run.due(NOW + 2000) == []  # given up
    assert run.publish(insight("occupied", end=NOW + 2000), NOW + 2000) == ["fire"]  # a new episode
    assert run.policy.report() == {
        "sent": 0,
        "skipped": {"busy": 1, "stale": 1},
        "failed": {"server_error": 2, "timeout": 1},
    }


def test_a_write_that_ends_after_its_episode_does_not_swallow_the_next_one() -> None:
    run = Run((OCCUPIED,))
    run.publish(insight("occupied"), NOW)
    run.publish(insight("empty"), NOW + 1)  # ends while the request runs
    run.policy.finished(0, None)
    assert run.publish(insight("occupied"), NOW + 400) == ["fire"]


def test_rules_are_independent_and_mismatched_rules_are_counted() -> None:
    run = Run((OCCUPIED, HIGH_CO2))
    assert run.publish(insight("occupied"), NOW) == ["kind_mismatch", "fire"]
    assert run.publish(insight(value=900.0), NOW + 1) == ["kind_mismatch", "fire"]
    with pytest.raises(ValueError, match="unknown write-back skip reason"):
        run.policy.skip("bored")
    assert set(run.policy.skipped) <= set(SKIP_REASONS)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("writeback = 3", r"^\[insight\] writeback must be a list of tables"),
        ('writeback = [{device = "a", command = "c", values = {r = "1"}}]', r"when_label .* is required"),
        (
            'writeback = [{when_label = "x", when_above = 1, device = "a", command = "c", values = {r = "1"}}'
            "]",
            r"when_label goes alone",
        ),
        (
            'writeback = [{when_above = 3, when_below = 1, device = "a", command = "c", values = {r = "1"}}]',
            r"when_above \(3\) must be below when_below \(1\)",
        ),
        (
            'writeback = [{when_label = "x", device = "a", command = "c", values = {r = 1}}]',
            r"values must be",
        ),
        ('writeback = [{when_label = "x", command = "c", values = {r = "1"}}]', r"\] device must be"),
        (
            'writeback = [{when_label = "x", device = "a", command = "c", values = {r = "1"}, '
            "min_interval_s = 0}]",
            r"^\[insight.writeback\[0\]\] min_interval_s must be a number in 1.0..86400.0",
        ),
        (
            'writeback = [{when_label = "x", device = "a", command = "c", values = {r = "1"}, to = 1}]',
            "unknown keys",
        ),
    ],
)
def test_a_bad_rule_is_a_one_line_error_naming_it(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _writeback_rules(Table({"insight": tomllib.loads(toml)}, "insight", {"writeback"}))


def test_rules_load_from_toml_arrays_of_tables() -> None:
    doc = tomllib.loads(
        '[[insight.writeback]]\nwhen_label = "occupied"\ndevice = "hvac-1"\ncommand = "setpoint"\n'
        'values = { setpoint = "21.5" }\n\n[[insight.writeback]]\nwhen_above = 800\nwhen_below = 5000\n'
        'device = "ahu-1"\ncommand = "fan"\nvalues = { fanSpeed = "high" }\nmin_interval_s = 300\n'
    )
    assert _writeback_rules(Table(doc, "insight", {"writeback"})) == (OCCUPIED, HIGH_CO2)


# --- against a fake core-command that holds both sides to the spec --------------------------------


@dataclass
class CoreCommandDouble:
    """core-command's ``PUT /api/v3/device/name/{name}/{command}``; ``answer`` picks the reply:
    ``200``, ``404``, ``423``, ``500`` (each as the spec documents it) or ``slow`` (no answer for
    ``delay_s``). Spec mismatches are collected (assertions in the server thread would be lost)."""

    version: str
    answer: str = "200"
    delay_s: float = 2.0
    token: str | None = None
    received: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    spec_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.spec = load_spec(self.version, "core-command")
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                double.handle(self)

            def do_GET(self) -> None:
                double.handle(self)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        headers = dict(h.headers.items())
        url = self.url + h.path
        try:
            validate_request(self.spec, h.command, url, body, headers)
        except SpecMismatch as exc:
            self.spec_errors.append(str(exc))
        self.received.append((h.command, h.path, headers, json.loads(body) if body else None))
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            status, reply = 401, {"apiVersion": "v3", "statusCode": 401, "message": "unauthorized"}
        elif self.answer == "slow":
            time.sleep(self.delay_s)
            status, reply = 200, {"apiVersion": "v3", "statusCode": 200}
        elif self.answer == "200":
            status, reply = 200, {"apiVersion": "v3", "requestId": str(uuid.uuid4()), "statusCode": 200}
        else:
            status = int(self.answer)
            reply = {"apiVersion": "v3", "statusCode": status, "message": f"core-command says {status}"}
        data = json.dumps(reply).encode()
        out_headers = {
            "Content-Type": "application/json",
            "X-Correlation-ID": headers.get("X-Correlation-ID", ""),
        }
        if status != 401:  # 401 comes from the gateway, which the spec does not describe
            try:
                validate_response(self.spec, h.command, url, status, data, out_headers, headers)
            except SpecMismatch as exc:
                self.spec_errors.append(str(exc))
        try:
            h.send_response(status)
            for name, value in out_headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:  # the client gave up (the timeout case)
            pass


@pytest.fixture(params=SPEC_VERSIONS)
def core_command(request: pytest.FixtureRequest) -> Iterator[CoreCommandDouble]:
    double = CoreCommandDouble(request.param)
    yield double
    double.close()


def test_the_client_puts_a_setting_request_as_the_spec_says(core_command: CoreCommandDouble) -> None:
    core_command.token = "header.payload.signature"
    client = CoreCommandClient(core_command.url + "/", token="header.payload.signature")
    client.set_command("HVAC unit/1", "setpoint", {"setpoint": "21.5", "mode": "heat"})
    client.close()
    ((method, path, headers, body),) = core_command.received
    assert (method, path) == ("PUT", "/api/v3/device/name/HVAC%20unit%2F1/setpoint")
    assert body == {"setpoint": "21.5", "mode": "heat"}
    assert headers["Content-Type"] == "application/json"
    assert uuid.UUID(headers["X-Correlation-ID"])
    assert core_command.spec_errors == []


@pytest.mark.parametrize(
    ("answer", "reason"), [("404", "not_found"), ("423", "locked"), ("500", "server_error")]
)
def test_an_error_answer_is_one_error_with_its_reason_and_no_retry(
    core_command: CoreCommandDouble, answer: str, reason: str
) -> None:
    core_command.answer = answer
    client = CoreCommandClient(core_command.url)
    with pytest.raises(CoreCommandError) as failed:
        client.set_command("hvac-1", "setpoint", {"setpoint": "21.5"})
    assert failed.value.reason == reason and failed.value.status == int(answer)
    assert f"core-command says {answer}" in str(failed.value)
    assert len(core_command.received) == 1  # never retried here
    assert core_command.spec_errors == []


def test_a_slow_core_command_is_a_timeout_and_a_refused_token_unauthorized(
    core_command: CoreCommandDouble,
) -> None:
    core_command.answer, core_command.delay_s = "slow", 1.0
    started = time.monotonic()
    with pytest.raises(CoreCommandError) as failed:
        CoreCommandClient(core_command.url, timeout_s=0.2).set_command("hvac-1", "setpoint", {"s": "1"})
    assert failed.value.reason == "timeout" and time.monotonic() - started < 0.9
    core_command.answer, core_command.token = "200", "good"
    with pytest.raises(CoreCommandError) as refused:
        CoreCommandClient(core_command.url, token="bad").set_command("hvac-1", "setpoint", {"s": "1"})
    assert refused.value.reason == "unauthorized"
    with pytest.raises(CoreCommandError, match="invalid_argument"):
        CoreCommandClient("edgex-core-command:59882")


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_rules_thread_writes_counts_failures_and_never_blocks_the_caller(
    core_command: CoreCommandDouble, caplog: pytest.LogCaptureFixture
) -> None:
    client = CoreCommandClient(core_command.url, timeout_s=0.3)
    writeback = Writeback((OCCUPIED,), 900.0, client.set_command)
    writeback.start()
    try:
        writeback.prediction_published(insight("occupied"), NOW)
        wait_for(lambda: writeback.report()["sent"] == 1)
        assert core_command.received[-1][1:4:2] == (
            "/api/v3/device/name/hvac-1/setpoint",
            {"setpoint": "21.5"},
        )

        # A new episode whose write fails with a 500: counted, retried after the interval.
        core_command.answer = "500"
        writeback.prediction_published(insight("empty"), NOW + 400)
        writeback.prediction_published(insight("occupied", end=NOW + 401), NOW + 401)
        wait_for(lambda: writeback.report()["failed"] == {"server_error": 1})
        # Now it hangs: the caller is not held up, the thread gives up after its timeout.
        core_command.answer, core_command.delay_s = "slow", 1.0
        started = time.monotonic()
        writeback.tick(NOW + 701)
        assert time.monotonic() - started < 0.1
        wait_for(lambda: writeback.report()["failed"] == {"server_error": 1, "timeout": 1})
        core_command.answer = "200"
        writeback.tick(NOW + 1001)
        wait_for(lambda: writeback.report()["sent"] == 2)
        assert writeback.report() == {
            "sent": 2,
            "skipped": {"not_matched": 1},
            "failed": {"server_error": 1, "timeout": 1},
        }
    finally:
        writeback.stop()
        client.close()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "fedge.agent.writeback" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 2 and "insights.writeback.failed.server_error" in warnings[0]
    assert core_command.spec_errors == []


def test_the_agent_wires_both_off_by_default_and_on_from_its_config(
    tmp_path: Path, har_model_dir: Path, core_command: CoreCommandDouble
) -> None:
    """``AgentService``: nothing by default; with the keys set, a published prediction reaches the
    Home Assistant discovery and the rules, and the status counts both (``insights``)."""
    fleet = create_fleet(
        tmp_path, "wb", har_model_dir, "mqtt://127.0.0.1:9", {"watch-01": 1}, {"min_devices": 1}
    )

    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, task.input_dim), np.float32), np.empty((0,), np.int32)

    def agent(env: dict[str, str]) -> AgentService:
        config = load_agent_config(fleet.agent_configs["watch-01"], env)
        return AgentService(build_agent(config, ProvidedData(provider)))

    plain = agent({})
    assert plain.home_assistant is None and plain.writeback is None
    assert set(plain.status()["insights"]) == {"publish", "published", "skipped", "last"}

    rule = (
        '[{when_label = "occupied", device = "hvac-1", command = "setpoint", values = {setpoint = "21.5"}}]'
    )
    with pytest.raises(ConfigError, match=r"\[edgex\] core_command"):
        load_agent_config(fleet.agent_configs["watch-01"], {"FEDGE_AGENT__INSIGHT__WRITEBACK": rule})
    service = agent(
        {
            "FEDGE_AGENT__INSIGHT__HOME_ASSISTANT": "true",
            "FEDGE_AGENT__EDGEX__CORE_COMMAND": core_command.url,
            "FEDGE_AGENT__INSIGHT__WRITEBACK": rule,
        }
    )
    assert service.home_assistant is not None and service.writeback is not None
    sent: list[str] = []
    service.home_assistant.publish = lambda topic, data: sent.append(topic) is None
    doc = {**insight("occupied"), "device_id": "watch-01", "fleet": "wb"}
    doc.update(task={"name": "occupancy", "kind": "classification"}, model={"version": 3, "generation": 1})
    service.writeback.start()
    try:
        service._insight_published(doc, NOW)
        wait_for(lambda: service.status()["insights"]["writeback"]["sent"] == 1)
    finally:
        service.writeback.stop()
    insights = service.status()["insights"]
    assert insights["home_assistant"] == {"topic": sent[0], "published": 1, "failed": 0}
    assert sent == ["homeassistant/sensor/fedge_wb_watch-01/prediction/config"]
    assert core_command.received[-1][1] == "/api/v3/device/name/hvac-1/setpoint"
