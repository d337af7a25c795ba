"""``fedge evaluate --global``: the fleet's current signed global model, fetched from a real
Mosquitto broker, verified as a device verifies it, and scored as ``--model-dir`` scores a model.

The round engine publishes for real: a real model (``build_model_dir``), a :class:`RoundEngine`
(no service) whose first ``open_round`` signs a manifest over the model's initial weights and a
normalisation; a plain paho client retains its blobs and manifest as the aggregator does.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.agent.edgex.profile import load_profile
from fedge.aggregator.round_engine import EngineState, RoundEngine
from fedge.aggregator.service import load_model
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.tools.evaluate import main as evaluate_main
from fedge.tools.global_model import GlobalModelError, read_verify_keys
from fedge.tools.task_init import choose_task, write_task
from support.engine_helpers import AGGREGATOR_KEY, SIGNING_KEY, registry, settings

pytest_plugins = ("support.mqtt_fixtures",)

FLEET = "fleet-1"
PROFILE_YAML = """\
name: "Room-Sensors"
deviceResources:
  - name: "t"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "co2"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "occupied"
    properties: { valueType: "Bool", readWrite: "R" }
deviceCommands:
  - name: "all"
    readWrite: "R"
    resourceOperations:
      - { deviceResource: "t" }
      - { deviceResource: "co2" }
      - { deviceResource: "occupied" }
"""


@pytest.fixture(scope="module")
def room_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TaskSpec]:
    workdir = tmp_path_factory.mktemp("evaluate-global")
    profile = workdir / "room.yaml"
    profile.write_text(PROFILE_YAML)
    path = workdir / "occupied.toml"
    return path, write_task(choose_task(load_profile(profile), "occupied"), path, str(profile), force=True)


def write_csv(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = rng.normal(21.0, 2.0, n)
    co2 = rng.normal(600.0, 150.0, n)
    occupied = (t - 21.0) / 2.0 + (co2 - 600.0) / 150.0 > 0
    lines = ["occupied,t,co2"] + [
        f"{'true' if occupied[i] else 'false'},{float(t[i])!r},{float(co2[i])!r}" for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def publish_round(broker: MosquittoBroker, model_dir: Path, normalisation: Normalisation) -> RoundManifest:
    """The real engine's first round over the model's initial weights, retained on the broker
    (blobs first, then the manifest, as the aggregator publishes)."""
    loaded = load_model(model_dir)
    state = EngineState(
        version=0,
        last_manifest_sha256="",
        completed_rounds=0,
        weights=loaded.initial_weights.copy(),
        normalisation=normalisation,
        counters={},
    )
    engine = RoundEngine(
        FLEET,
        settings(),
        loaded.manifest,
        loaded.model,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(),
        state,
    )
    publication = engine.open_round(1_700_000_000.0)  # long expired: --global does not mind
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    try:
        for topic, payload in publication.blobs.items():
            publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        publisher.publish(
            FleetTopics(FLEET).manifest, publication.manifest_frame, qos=1, retain=True
        ).wait_for_publish(10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    return publication.manifest


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = evaluate_main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def verify_key_line(path: Path, key: SigningKey) -> Path:
    """The line ``fedge keys aggregator`` prints for the agents' config."""
    text = base64.b64encode(bytes(key.verify_key)).decode()
    path.write_text(f'aggregator_verify_keys = ["{text}"]  # key id ...\n')
    return path


def test_global_model_scores_equal_model_dir_scores(
    capsys: pytest.CaptureFixture[str],
    mosquitto: MosquittoBroker,
    build_model_dir: Callable[[TaskSpec], Path],
    room_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    task_path, task = room_task
    model_dir = build_model_dir(task)
    normalisation = Normalisation((21.0, 600.0), (2.0, 150.0))
    manifest = publish_round(mosquitto, model_dir, normalisation)
    assert manifest.version == 1 and manifest.normalisation == normalisation
    csv_path = write_csv(tmp_path / "test.csv", 90, seed=3)
    key_file = verify_key_line(tmp_path / "aggregator.pub", SIGNING_KEY)

    common = ("--task", str(task_path), "--csv", str(csv_path), "--json")
    code, out, err = run(
        capsys,
        *common,
        *("--global", mosquitto.url, "--fleet", FLEET, "--verify-key", str(key_file), "--timeout", "15"),
    )
    assert code == 0, err
    fetched = json.loads(out)
    assert err.strip() == (
        f"fedge evaluate: scoring fleet {FLEET}'s global model: manifest v1, round 1 "
        f"({manifest.round_id}, phase {manifest.phase})"
    )

    norm_file = tmp_path / "normalisation.json"
    norm_file.write_text(json.dumps(normalisation.to_dict()))
    code, out, err = run(capsys, *common, "--model-dir", str(model_dir), "--normalisation", str(norm_file))
    assert code == 0, err
    local = json.loads(out)

    assert fetched["examples"] == local["examples"] == 90
    for metric in ("loss", "accuracy", "confusion_matrix", "quality", "classes"):
        assert fetched[metric] == local[metric], metric
    assert fetched["normalisation"] == "manifest"
    assert fetched["weights"] == f"blob {manifest.weights_sha256[:16]}"
    assert fetched["global_model"] == {
        "fleet": FLEET,
        "version": 1,
        "round_number": 1,
        "round_id": manifest.round_id,
        "phase": manifest.phase,
        "issued_at": manifest.issued_at,
        "manifest_sha256": manifest.sha256(),
        "weights_sha256": manifest.weights_sha256,
    }
    assert local["global_model"] is None

    # The table names the manifest it scored.
    code, out, _ = run(
        capsys,
        *("--task", str(task_path), "--csv", str(csv_path)),
        *("--global", mosquitto.url, "--fleet", FLEET, "--verify-key", str(key_file)),
    )
    assert code == 0
    assert out.splitlines()[0] == (
        f"scored the global model of fleet {FLEET}: manifest v1, round 1 "
        f"({manifest.round_id}, phase {manifest.phase})"
    )

    # Another key: refused, naming the reason, before anything is printed.
    wrong = tmp_path / "other.key"
    wrong.write_text(base64.b64encode(bytes(SigningKey.generate().verify_key)).decode() + "\n")
    code, out, err = run(
        capsys,
        *common,
        *("--global", mosquitto.url, "--fleet", FLEET, "--verify-key", str(wrong), "--timeout", "15"),
    )
    assert code == 2 and out == ""
    assert err.startswith("fedge: error: the round manifest of fleet fleet-1 was refused: unknown_key: ")
    assert len(err.splitlines()) == 1


def test_no_manifest_within_the_timeout(
    capsys: pytest.CaptureFixture[str],
    mosquitto: MosquittoBroker,
    room_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    task_path, _ = room_task
    csv_path = write_csv(tmp_path / "test.csv", 10, seed=1)
    key_file = verify_key_line(tmp_path / "aggregator.pub", SIGNING_KEY)
    code, out, err = run(
        capsys,
        *("--task", str(task_path), "--csv", str(csv_path)),
        *("--global", mosquitto.url, "--fleet", "empty-fleet", "--verify-key", str(key_file)),
        *("--timeout", "1"),
    )
    assert (code, out) == (2, "")
    assert err == (
        "fedge: error: no round manifest on fedge/v1/empty-fleet/manifest within 1 s: check "
        "--fleet, and that the aggregator has published a round\n"
    )


def test_global_options_are_checked(
    capsys: pytest.CaptureFixture[str], room_task: tuple[Path, TaskSpec], tmp_path: Path
) -> None:
    task_path, _ = room_task
    base = ("--task", str(task_path), "--csv", str(tmp_path / "x.csv"))
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["evaluate", *base, "--model-dir", str(tmp_path), "--global", "mqtt://localhost:1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    code, _, err = run(capsys, *base, "--global", "mqtt://localhost:1", "--fleet", FLEET)
    assert (code, err) == (2, "fedge: error: --global needs --verify-key\n")
    code, _, err = run(capsys, *base, "--model-dir", str(tmp_path), "--fleet", FLEET)
    assert (code, err) == (2, "fedge: error: --fleet: only with --global BROKER_URL\n")


def test_verify_key_files(tmp_path: Path) -> None:
    """The base64 key alone, ``fedge keys aggregator``'s TOML line or --json, an agent config."""
    key = SigningKey.generate().verify_key
    text = base64.b64encode(bytes(key)).decode()
    forms = {
        "plain.key": text + "\n",
        "line.toml": f'aggregator_verify_keys = ["{text}"]  # key id x\n',
        "keys.json": json.dumps({"verify_key": text, "public_key": "x"}),
        "agent.toml": f'[agent]\nfleet = "f"\naggregator_verify_keys = ["{text}"]\n',
    }
    for name, content in forms.items():
        path = tmp_path / name
        path.write_text(content)
        assert list(read_verify_keys(path).values()) == [key], name
    private = tmp_path / "aggregator.sign"
    private.write_text(text)
    with pytest.raises(GlobalModelError, match="private signing key"):
        read_verify_keys(private)
    bad = tmp_path / "bad.key"
    bad.write_text("not base64!\n")
    with pytest.raises(GlobalModelError, match="--verify-key"):
        read_verify_keys(bad)
