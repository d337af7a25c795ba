"""The arm64 agent image (a board's), built and started under qemu-user-static.

Emulated, the debootstrap of the arm64 base and the pip install take ~17 min, so this runs from
``make images-arm64`` (``FEDGE_ARM64=1``), not in ``make test``. What it proves: the image is
arm64, its Python and wheels (numpy, ai-edge-litert, PyNaCl) load on aarch64, and the agent, in
the container with the image's entrypoint, connects to a real broker and publishes its status.

Not proven here: a LiteRT training step. Under Debian 12's qemu-user 7.2 the aarch64
ai-edge-litert 2.3 wheel segfaults while building an interpreter (with the default CPU model
and with ``QEMU_CPU=cortex-a72``, with and without the default XNNPACK delegate), so training
on arm64 needs a real board; the same code path is proven on x86-64 in every CI run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedge.lab.broker import MosquittoBroker
from fedge.lab.container_agent import podman_run_command, stage_container_agent
from fedge.lab.provision import create_fleet
from fedge.protocol.topics import FleetTopics
from support.mqtt_fixtures import TrafficRecorder
from support.podman_support import ROOT, build_agent_image, podman, remove_containers, require_podman

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDGE_ARM64") != "1",
        reason="emulated arm64 build (~17 min): make images-arm64 sets FEDGE_ARM64=1",
    ),
]
pytest_plugins = ("support.mqtt_fixtures",)
FLEET = "arm64"
PROBE = (
    "import json, platform, numpy, nacl.public, ai_edge_litert.interpreter; "
    "print(json.dumps({'machine': platform.machine(), 'numpy': numpy.__version__}))"
)


@pytest.fixture(scope="module")
def arm64_image() -> str:
    require_podman()
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.fail("no qemu-aarch64 binfmt handler: make images-arm64 registers it")
    tag, size = build_agent_image(arch="arm64", timeout=3600)
    assert tag.endswith("-arm64")
    print(f"\narm64 agent image {tag}: {size / 1e6:.0f} MB")
    return tag


def test_arm64_image_loads_its_wheels_on_aarch64(arm64_image: str) -> None:
    arch = podman("image", "inspect", "--format", "{{.Architecture}}", arm64_image).stdout.strip()
    assert arch == "arm64"
    result = podman("run", "--rm", "--arch", "arm64", "--entrypoint", "python", arm64_image, "-c", PROBE)
    assert json.loads(result.stdout.strip().splitlines()[-1])["machine"] == "aarch64"
    usage = podman("run", "--rm", "--arch", "arm64", arm64_image, "--help", timeout=300)
    assert "--config" in usage.stdout


def test_arm64_agent_starts_and_reports_to_a_broker(
    arm64_image: str, tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> None:
    """The board's agent, emulated: connects over MQTT and publishes its retained status."""
    task = ROOT / "tasks" / "har-watch.toml"
    profile = ROOT / "edgex_profiles" / "wearable-imu.yaml"
    fleet = create_fleet(
        tmp_path / "fleet", FLEET, har_model_dir, mosquitto.url, {"watch-01": 1}, {"rounds": 1},
        edgex={"prefix": "edgex", "profile": str(profile)}, task_file=task,
    )  # fmt: skip
    config = fleet.agent_configs["watch-01"]
    agent = stage_container_agent(config, tmp_path / "box", name_prefix="fedge-arm64")
    topic = FleetTopics(FLEET).status("watch-01")
    command = podman_run_command(agent, arm64_image)
    try:
        with TrafficRecorder.for_broker(mosquitto) as recorder:
            podman(*command[1:3], "-d", *command[3:])
            recorder.wait_for(lambda ms: any(m.topic == topic and m.payload for m in ms), 300, "status")
            status = json.loads([m for m in recorder.messages if m.topic == topic][-1].payload)
        assert status["device_id"] == "watch-01"
        assert status["state"] != "offline"
        logs = podman("logs", agent.name).stdout + podman("logs", agent.name).stderr
        assert f"connected to {mosquitto.url}" in logs
    finally:
        remove_containers([agent.name])
