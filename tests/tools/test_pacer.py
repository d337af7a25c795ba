"""The lab's pacer (fedge.lab.pacer): the schedule of frozen devices, and real processes frozen
and thawed by it (``/proc/<pid>/stat`` says ``T`` while stopped)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from fedge.lab.pacer import Pacer
from fedge.protocol.errors import FedgeError


def test_a_slow_device_runs_one_fifth_of_each_period_at_factor_5() -> None:
    pacer = Pacer({"watch-06": 60}, factor=5.0, period_s=1.0)
    assert pacer.frozen_at(0.1) == set()
    assert pacer.frozen_at(0.2) == {60}
    assert pacer.frozen_at(0.9) == {60}
    assert pacer.frozen_at(1.05) == set()
    samples = [pacer.frozen_at(i / 1000) for i in range(10_000)]
    assert abs(sum(1 for f in samples if f) - 8000) <= 10  # frozen 80 % of the time: 5 x slower


def test_intermittent_devices_are_offline_in_turn_for_outage_s() -> None:
    pacer = Pacer({}, intermittent={"a": 1, "b": 2}, outage_s=10.0, outage_every_s=40.0)
    offline = {t: pacer.frozen_at(float(t)) for t in range(0, 40)}
    assert [t for t, f in offline.items() if 1 in f] == list(range(30, 40))
    assert [t for t, f in offline.items() if 2 in f] == list(range(10, 20))


def test_a_bad_schedule_is_refused() -> None:
    with pytest.raises(FedgeError, match=r"a slow device.s factor must be at least 1, got 0\.5"):
        Pacer({"a": 1}, factor=0.5)
    with pytest.raises(FedgeError, match="outage_s must be above 0 and below outage_every_s"):
        Pacer({}, intermittent={"a": 1}, outage_s=5.0, outage_every_s=5.0)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_paced_process_is_stopped_and_thawed_when_the_pacer_stops() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        pacer = Pacer({"slow": proc.pid}, factor=1000.0, period_s=100.0, tick_s=0.01)
        pacer.start()
        deadline = time.monotonic() + 10
        while _state(proc.pid) != "T":
            assert time.monotonic() < deadline, "never stopped"
            time.sleep(0.01)
        pacer.stop()
        assert _state(proc.pid) in ("S", "R")
    finally:
        proc.kill()
        proc.wait()
