"""The arm64 agent image (a board's), built and run under qemu-user-static.

Emulated, the debootstrap of the arm64 base and the pip install take minutes, so this runs from
``make images-arm64`` (``FEDGE_ARM64=1``), not in ``make test``. The proof is the same training
step on the same model in the arm64 container (LiteRT's aarch64 wheel, under emulation) and on
the host: equal weights to float tolerance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from podman_support import ROOT, build_images, podman, require_podman

from agent.trainer import LiteRTTrainer
from fedge.train_local import build_model_files
from protocol.task import parse_task_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDGE_ARM64") != "1",
        reason="emulated arm64 build (~15 min): make images-arm64 sets FEDGE_ARM64=1",
    ),
]

STEP = r"""
import json, platform, sys
import numpy as np
from agent.trainer import LiteRTTrainer
trainer = LiteRTTrainer.from_dir(__import__("pathlib").Path("/model"), runtime="ai_edge_litert")
data = np.load("/model/batch.npz")
loss = trainer.train_step(data["x"], data["y"])
np.save("/out/weights.npy", trainer.get_weights())
print(json.dumps({"machine": platform.machine(), "loss": loss, "runtime": trainer.runtime.name}))
"""


def test_arm64_agent_image_trains_like_the_host(tmp_path: Path) -> None:
    require_podman()
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.fail("no qemu-aarch64 binfmt handler: make images-arm64 registers it")
    sizes = build_images("agent", arch="arm64", timeout=3600)
    [(tag, size)] = [(t, s) for t, s in sizes.items() if "fedge-agent" in t]
    assert tag.endswith("-arm64")
    print(f"\narm64 agent image {tag}: {size / 1e6:.0f} MB")
    arch = podman("image", "inspect", "--format", "{{.Architecture}}", tag).stdout.strip()
    assert arch == "arm64"

    model = tmp_path / "model"
    build_model_files(parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text()), model)
    host = LiteRTTrainer.from_dir(model, runtime="ai_edge_litert")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, host.manifest.task.input_dim)).astype(np.float32)
    y = rng.integers(0, host.manifest.task.output_dim, size=32).astype(np.int32)
    np.savez(model / "batch.npz", x=x, y=y)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    result = podman(
        "run", "--rm", "--arch", "arm64", "--entrypoint", "python",
        "--volume", f"{model}:/model:ro", "--volume", f"{out}:/out",
        tag, "-c", STEP, timeout=900,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["machine"] == "aarch64"
    assert report["runtime"] == "ai_edge_litert"
    host_loss = host.train_step(x, y)
    assert report["loss"] == pytest.approx(host_loss, rel=1e-5)
    np.testing.assert_allclose(np.load(out / "weights.npy"), host.get_weights(), rtol=1e-5, atol=1e-6)
