"""An idle agent wakes only when there is work (issue 18): no polling loops.

A real agent (``AgentService`` from its config through ``build_agent``) on a real Mosquitto, its
trainer stubbed as in ``test_sparse_agent_service.py`` (what is under test is the service's
threads, not LiteRT). Wake-ups are counted twice: the worker's own count
(``AgentService.worker_wakeups``) and the kernel's, each thread's context switches in
``/proc/self/task/<tid>/status``. The test thread is the aggregator: a real
:class:`~fedge.aggregator.round_engine.RoundEngine` whose manifest and blobs it publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.config import load_agent_config
from fedge.agent.core import Load, Train
from fedge.agent.live import NO_LIVE_WINDOWS, LiveWindows
from fedge.agent.service import IDLE_WAKE_S, LIVE_POLL_MAX_S, AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.task import TaskSpec
from fedge.shell.mqtt import KEEPALIVE_WAKES, connect, ephemeral_settings, make_client, start_loop, stop_loop
from support.agent_network import DEVICE, WAIT_S, Network, no_data, running, wait_for, write_agent_config
from support.engine_helpers import DEVICE_IDS, TOPICS, P, make_engine, settings

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")

# WAIT_S is under IDLE_WAKE_S: a worker that missed its wake-up would sleep past it.
DELTA = np.random.default_rng(7).normal(0.0, 0.02, P).astype(np.float32)
IDLE_S = 3.0


@pytest.fixture
def network(mosquitto: MosquittoBroker) -> Iterator[Network]:
    net = Network(mosquitto, statuses=True)
    yield net
    net.stop()


def make_agent(tmp_path: Path, broker: MosquittoBroker, status_interval_s: float) -> AgentService:
    config = load_agent_config(write_agent_config(tmp_path / "agent", broker, status_interval_s), {})
    agent = AgentService(build_agent(config, ProvidedData(no_data)))

    def load(action: Load) -> None:  # no LiteRT: what is under test is the service
        agent.core.model_loaded(action.manifest.model_sha256)

    def train(action: Train) -> list[Any]:
        return agent.core.trained(DELTA, 40, 0.5, None, agent.clock())

    agent._load = load  # type: ignore[method-assign]
    agent._train = train  # type: ignore[method-assign]
    return agent


def switches(tid: int | None) -> int:
    """A thread's context switches so far (voluntary and not): each sleep and wake counts."""
    total = 0
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            total += int(line.split()[1])
    return total


def agent_threads(agent: AgentService, runner: threading.Thread) -> dict[str, int | None]:
    """The agent's threads by role, with the kernel's name for those the agent names."""
    worker = next(t for t in threading.enumerate() if t.name == "fedge-agent-worker")
    paho = agent.client._thread
    assert paho is not None
    threads = {"main": runner.native_id, "worker": worker.native_id, "mqtt": paho.native_id}
    comm = {role: Path(f"/proc/self/task/{tid}/comm").read_text().strip() for role, tid in threads.items()}
    assert (comm["worker"], comm["mqtt"]) == ("fedge-worker", "fedge-mqtt")  # top -H tells them apart
    return threads


def test_an_idle_agent_sleeps_and_a_manifest_wakes_it_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network
) -> None:
    """Connected, no round, a status interval of an hour: over a few seconds the worker, the
    main thread and paho's thread each wake at most a couple of times (they woke 2, 2 and 1
    times a second when they polled). A manifest arriving then is handled at once: the update
    comes back well within IDLE_WAKE_S, the longest the worker could otherwise sleep."""
    agent = make_agent(tmp_path, mosquitto, status_interval_s=3600.0)
    result: list[int] = []
    with running(agent, result) as runner:
        network.statuses.get(timeout=WAIT_S)  # connected: the first status is out
        time.sleep(0.5)  # the connection's own work (subscriptions, READY, the status's PUBACK)
        threads = agent_threads(agent, runner)
        before = {role: switches(tid) for role, tid in threads.items()}
        woke = agent.worker_wakeups
        time.sleep(IDLE_S)
        after = {role: switches(tid) for role, tid in threads.items()}
        assert agent.worker_wakeups - woke <= 1
        assert {role: after[role] - before[role] <= 2 for role in threads} == dict.fromkeys(threads, True), (
            before,
            after,
        )
        assert network.frames.empty()

        engine = make_engine(settings(), devices=DEVICE_IDS[:3])
        pub = engine.open_round(time.time())
        for topic, blob in pub.blobs.items():
            network.publish(topic, blob)
        network.publish(TOPICS.manifest, pub.manifest_frame)
        assert WAIT_S < IDLE_WAKE_S
        topic, frame = network.frames.get(timeout=WAIT_S)
        assert topic == TOPICS.update(DEVICE)
        assert engine.handle(topic, frame, time.time()).accepted
        wait_for("the outbox emptied by the PUBACK", lambda: agent.outbox.stats().pending == 0)
    assert result == [0]


def test_the_status_still_goes_out_on_its_interval_one_wake_up_each(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network
) -> None:
    agent = make_agent(tmp_path, mosquitto, status_interval_s=1.0)
    result: list[int] = []
    with running(agent, result):
        network.statuses.get(timeout=WAIT_S)
        network.statuses.get(timeout=WAIT_S)  # the interval's first
        woke = agent.worker_wakeups
        for _ in range(4):
            network.statuses.get(timeout=WAIT_S)  # each within the interval: the worker woke for it
        # One wake-up per status (the deadline), and a little slack; polling woke it 2 a second.
        assert agent.worker_wakeups - woke <= 4 + 2
    assert result == [0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death, on purpose
def test_a_dead_worker_still_makes_run_return_1_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    """The main thread waits for stop alone (no timeout): the dying worker requests it."""
    agent = make_agent(tmp_path, mosquitto, status_interval_s=3600.0)
    turns: list[int] = []

    def work_once() -> None:
        turns.append(1)
        if len(turns) == 2:
            raise SystemExit(3)  # escapes the turn's own handlers, as an interrupt does

    agent._work_once = work_once  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, "fedge.agent")
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    runner.start()
    network.statuses.get(timeout=WAIT_S)  # connected: the connection's kick makes the second turn
    runner.join(WAIT_S)
    assert not runner.is_alive() and result == [1]
    assert "worker thread died" in [r.getMessage() for r in caplog.records]
    assert len(turns) == 2


def test_the_idle_beat_keeps_the_worker_far_from_looking_hung() -> None:
    """The worker's longest sleep against /healthz's and the heartbeat file's 120 s."""
    from fedge.agent.metrics import LIVE_MAX_AGE_S

    assert IDLE_WAKE_S <= LIVE_MAX_AGE_S / 4


def test_pahos_thread_waits_a_quarter_keepalive_is_named_and_stops_at_once(
    mosquitto: MosquittoBroker,
) -> None:
    """``start_loop``: the select waits keepalive / 4 (the PINGREQ still goes out before the
    broker's 1.5 x keepalive), the thread is named for the kernel, and ``stop_loop`` ends it
    without waiting for that timeout (disconnect's packet wakes the select)."""
    mqtt_settings = ephemeral_settings(mosquitto.host, mosquitto.port, False, "wakeups")
    client = make_client(mqtt_settings, persistent=False)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    connect(client, mqtt_settings)
    start_loop(client, "fedge-test-mqtt")
    assert connected.wait(WAIT_S)
    thread = client._thread
    assert thread is not None and thread.native_id is not None
    assert client.network_wait_s == mqtt_settings.keepalive / KEEPALIVE_WAKES == 7.5  # type: ignore[attr-defined]
    assert Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip() == "fedge-test-mqtt"
    stopper = threading.Thread(target=stop_loop, args=(client,))
    stopper.start()
    stopper.join(5.0)  # well under the select's 7.5 s: disconnect's packet woke it
    assert not stopper.is_alive() and not thread.is_alive()


class SilentLiveSource:
    """A live source that cannot announce its windows (no ``set_live_listener``: a source of
    one's own; fedge's EdgeX and CSV sources announce them), whose sensor feed is silent: it
    counts how often it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return no_data(task)

    def available(self) -> int | None:
        return None

    def report(self) -> dict[str, Any] | None:
        return None

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        self.asked += 1
        return NO_LIVE_WINDOWS


def test_a_source_that_cannot_announce_windows_is_asked_less_and_less_while_none_come(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network
) -> None:
    """Every LIVE_POLL_S while windows come, twice as long after each empty ask, at most
    LIVE_POLL_MAX_S: a silent feed costs the worker a wake-up every few seconds, not two a second."""
    config = load_agent_config(write_agent_config(tmp_path / "agent", mosquitto, 3600.0), {})
    source = SilentLiveSource()
    agent = AgentService(build_agent(config, source))
    result: list[int] = []
    with running(agent, result):
        network.statuses.get(timeout=WAIT_S)
        wait_for(
            "the asks to back off to the longest interval", lambda: agent._live_poll_s == LIVE_POLL_MAX_S
        )
        asked, woke = source.asked, agent.worker_wakeups
        time.sleep(IDLE_S)
        assert source.asked - asked <= 1 and agent.worker_wakeups - woke <= 1
    assert result == [0]
