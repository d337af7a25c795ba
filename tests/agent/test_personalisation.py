"""Personalisation on the device, fine-tune-after-global (``fedge.agent.personal``,
``docs/personalisation.md``), with the real LiteRT interpreter on the real smartwatch data.

The global model is trained centrally with LiteRT on the training subjects (1-7); a device is a
held-out subject whose samples are skewed to a few of the seven exercises (label skew on top of
the subject's own way of moving: an honest non-IID device). Its held-out part is the last 30 % of
each exercise's windows, so no held-out window overlaps a trained one (windows overlap by half:
a random split would let neighbours of a held-out window into training).

The agent's whole path (broker, aggregator, insight, status, restart, the federated update with
personalisation on and off) is ``test_personalised_agent.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.config import InsightSettings, PersonalisationSettings, load_agent_config
from fedge.agent.insight import InsightPolicy, Prediction, insight_payload
from fedge.agent.live import LiveWindow
from fedge.agent.personal import (
    PERSONAL_FILE,
    PersonalEvaluation,
    Personaliser,
    PersonalStorageFault,
    PersonalStore,
    PersonalWeights,
    fine_tune,
    from_bytes,
    to_bytes,
)
from fedge.agent.service import AgentService
from fedge.agent.trainer import LiteRTTrainer, load_model_dir
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.lab import har_watch
from fedge.lab.provision import create_fleet
from fedge.lab.train_local import normalisation_of
from fedge.protocol.codec import Codec
from fedge.protocol.config_source import ConfigError
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_to_bytes
from fedge.shell.storage_faults import StorageFault
from support.asyncapi import load_document
from support.cli import fedge
from support.tiny_fs import TinyFs

pytest_plugins = ("support.tiny_fs",)

FLEET = "pers"
DEVICE = "watch-09"
#: The device: subject 9 (not trained on centrally), three of the seven exercises (PEN, FEL, TRAP).
SUBJECT = 9
CLASSES = (0, 2, 5)
EPOCHS = 5
SEED = 0


def blocked_split(x: np.ndarray, y: np.ndarray, fraction: float) -> tuple[tuple[np.ndarray, ...], ...]:
    """The last ``fraction`` of each class's windows (in recording order) held out."""
    hold = np.zeros(y.shape[0], bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        hold[idx[idx.shape[0] - round(fraction * idx.shape[0]) :]] = True
    return (x[~hold], y[~hold]), (x[hold], y[hold])


def round_manifest(
    trainer: LiteRTTrainer, weights: np.ndarray, version: int, **changes: Any
) -> RoundManifest:
    """A train manifest for the real model and ``weights`` (the fields the device checks)."""
    blob = weights_to_bytes(weights)
    m = RoundManifest(
        fleet=FLEET,
        version=version,
        parent_sha256="ef" * 32,
        phase="train",
        round_number=version - 1,
        round_id=f"r{version - 1:04d}-v{version}",
        issued_at=1_700_000_000.0,
        deadline=1_700_000_060.0,
        expires_at=1_700_086_400.0,
        selected_devices=(DEVICE,),
        min_devices=1,
        codec=Codec.FP32,
        model_sha256=trainer.manifest.model_sha256,
        model_bytes=trainer.manifest.model_bytes,
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        weights_bytes=len(blob),
        model_manifest=trainer.manifest,
        normalisation=trainer.normalisation,
    )
    return replace(m, **changes)


@pytest.fixture(scope="module")
def world(har_model_dir: Path, har_task: TaskSpec) -> dict[str, Any]:
    """A global model trained centrally (LiteRT, 5 epochs, subjects 1-7) and the skewed device."""
    devices = har_watch.load_devices(har_task, (*har_watch.TRAIN_SUBJECTS, SUBJECT))
    x, y = har_watch.pooled(devices[s] for s in har_watch.TRAIN_SUBJECTS)
    model, manifest = load_model_dir(har_model_dir)
    trainer = LiteRTTrainer(model, manifest)
    trainer.normalisation = normalisation_of(x)
    trainer.fit(x, y, epochs=5, rng=np.random.default_rng(SEED))
    mine = devices[SUBJECT]
    keep = np.isin(mine.y, CLASSES)
    train, holdout = blocked_split(mine.x[keep], mine.y[keep], 0.3)
    return {"trainer": trainer, "global": trainer.get_weights(), "train": train, "holdout": holdout}


def tune(world: dict[str, Any], manifest: RoundManifest) -> PersonalWeights:
    return fine_tune(
        world["trainer"],
        manifest,
        world["global"],
        world["train"],
        world["holdout"],
        epochs=EPOCHS,
        seed=SEED,
    )


def test_on_a_skewed_device_the_personal_weights_beat_the_global_ones_and_the_trainer_stays_global(
    world: dict[str, Any],
) -> None:
    trainer, global_weights = world["trainer"], world["global"]
    manifest = round_manifest(trainer, global_weights, 12)
    started = time.perf_counter()
    personal = tune(world, manifest)
    elapsed = time.perf_counter() - started
    ev = personal.evaluation
    assert ev is not None and ev.metric == "accuracy" and ev.samples == world["holdout"][0].shape[0]
    print(
        f"\nsubject {SUBJECT}, classes {CLASSES}: {personal.trained_examples} trained, "
        f"{ev.samples} held out; accuracy global {ev.global_value:.3f}, "
        f"personal {ev.personal_value:.3f}; {EPOCHS} epochs {personal.seconds * 1000:.1f} ms, "
        f"with both evaluations {elapsed * 1000:.1f} ms"
    )
    assert ev.personal_value > ev.global_value + 0.2  # measured: 0.417 -> 1.000
    assert ev.global_value == trainer.evaluate(*world["holdout"]).accuracy  # the trainer is global again
    assert trainer.get_weights().tobytes() == global_weights.tobytes()
    assert not np.array_equal(personal.values, global_weights)
    assert (personal.global_version, personal.generation, personal.epochs) == (12, 1, EPOCHS)
    assert (personal.model_sha256, personal.global_weights_sha256) == (
        manifest.model_sha256,
        manifest.weights_sha256,
    )
    # The same data, seed and version: the same personal weights.
    assert tune(world, manifest).values.tobytes() == personal.values.tobytes()


def test_personal_weights_are_persisted_atomically_and_reloaded_after_a_restart(
    world: dict[str, Any], tmp_path: Path
) -> None:
    manifest = round_manifest(world["trainer"], world["global"], 12)
    store = PersonalStore(tmp_path / PERSONAL_FILE)
    personaliser = Personaliser(PersonalisationSettings(True, EPOCHS), store, SEED)
    assert personaliser.weights is None and personaliser.installed(manifest, world["global"]) is None
    assert personaliser.due() and personaliser.serving is None
    tuned = personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    assert not personaliser.due() and personaliser.serving is tuned and personaliser.unsaved is tuned
    assert not (tmp_path / PERSONAL_FILE).exists()  # the agent saves it (and counts a refusal)
    assert personaliser.save() and personaliser.unsaved is None
    assert (tmp_path / PERSONAL_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [PERSONAL_FILE]  # no temp file left

    restarted = Personaliser(
        PersonalisationSettings(True, EPOCHS), PersonalStore(tmp_path / PERSONAL_FILE), SEED
    )
    loaded = restarted.weights
    assert loaded == tuned and loaded is not None and loaded.values.tobytes() == tuned.values.tobytes()
    assert restarted.serving is None  # not before a global model it fits is installed
    assert restarted.installed(manifest, world["global"]) is None
    assert restarted.serving is loaded and not restarted.due()  # no second fine-tune of v12
    assert restarted.report() == {
        "personal_version": 12,
        "epochs": EPOCHS,
        "trained_examples": world["train"][0].shape[0],
        "seconds": tuned.seconds,
        "metric": "accuracy",
        "holdout_samples": world["holdout"][0].shape[0],
        "global": tuned.evaluation.global_value if tuned.evaluation else None,
        "personal": tuned.evaluation.personal_value if tuned.evaluation else None,
    }
    # A newer global model of the same model and generation: the v12 weights serve until v13's.
    v13 = round_manifest(world["trainer"], world["global"] * 0.5, 13)
    assert restarted.installed(v13, world["global"] * 0.5) is None
    assert restarted.serving is loaded and restarted.due()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_sha256": "ab" * 32}, "model_changed"),
        ({"generation": 2}, "generation_changed"),
        ({"version": 11}, "newer_version"),
        ({"weights_sha256": "cd" * 32}, "other_global_weights"),
    ],
)
def test_personal_weights_of_another_model_generation_or_version_are_refused_and_deleted(
    world: dict[str, Any], tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    manifest = round_manifest(world["trainer"], world["global"], 12)
    store = PersonalStore(tmp_path / PERSONAL_FILE)
    store.save(tune(world, manifest))
    personaliser = Personaliser(PersonalisationSettings(True, EPOCHS), store, SEED)
    assert personaliser.weights is not None
    other = replace(manifest, **change)
    note = personaliser.installed(other, world["global"])
    assert note is not None and f"refused ({reason})" in note, note
    assert personaliser.weights is None and personaliser.serving is None and personaliser.due()
    assert not (tmp_path / PERSONAL_FILE).exists()


def test_a_moments_manifest_installs_nothing_to_fine_tune(world: dict[str, Any], tmp_path: Path) -> None:
    personaliser = Personaliser(
        PersonalisationSettings(True, 1), PersonalStore(tmp_path / PERSONAL_FILE), SEED
    )
    moments = round_manifest(world["trainer"], world["global"], 1, phase="moments")
    assert personaliser.installed(moments, world["global"]) is None
    assert not personaliser.due() and personaliser.serving is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-4],  # truncated values
        lambda raw: b"NOTFEDGE" + raw[8:],  # not our file
        lambda raw: raw.replace(b'"metric": "accuracy"', b'"metric": "recall!!"'),
        lambda raw: raw[: raw.index(b"{")] + b"{" * (len(raw) - raw.index(b"{")),  # garbage header
    ],
)
def test_an_unreadable_personal_weights_file_is_logged_and_ignored(
    world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    weights = tune(world, round_manifest(world["trainer"], world["global"], 12))
    raw = to_bytes(weights)
    assert from_bytes(raw) == weights
    path = tmp_path / PERSONAL_FILE
    path.write_bytes(damage(raw))
    with caplog.at_level(logging.WARNING, "fedge.agent"):
        personaliser = Personaliser(PersonalisationSettings(True, EPOCHS), PersonalStore(path), SEED)
    assert personaliser.weights is None
    [record] = caplog.records  # one line, naming the file and what happens next
    assert record.getMessage().startswith(f"personal weights {path} ignored (")
    assert record.getMessage().endswith("): fine-tuning again") and "\n" not in record.getMessage()
    # ... and the installed global model is fine-tuned again, replacing the damaged file.
    manifest = round_manifest(world["trainer"], world["global"], 12)
    assert personaliser.installed(manifest, world["global"]) is None and personaliser.due()
    personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    assert personaliser.save() and PersonalStore(path).load() == personaliser.weights


def test_an_unreadable_personal_weights_path_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / PERSONAL_FILE
    path.mkdir()  # a directory where the file should be: reading it fails
    with caplog.at_level(logging.WARNING, "fedge.agent"):
        assert PersonalStore(path).load() is None
    assert [r.getMessage() for r in caplog.records] == [
        f"personal weights {path} not read (Is a directory): fine-tuning again"
    ]


def test_a_full_or_read_only_state_dir_keeps_the_personal_weights_in_memory_until_it_can_write(
    world: dict[str, Any], tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    fs = TinyFs(tmp_path / "state", "1m")
    tiny_fs.append(fs)
    path = fs.path / PERSONAL_FILE
    personaliser = Personaliser(PersonalisationSettings(True, EPOCHS), PersonalStore(path), SEED)
    personaliser.installed(round_manifest(world["trainer"], world["global"], 12), world["global"])
    fs.fill()
    tuned = personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    with pytest.raises(PersonalStorageFault) as refused:
        personaliser.save()
    assert isinstance(refused.value, StorageFault) and refused.value.fault == "full"
    assert str(refused.value) == f"cannot write personal weights {path}: No space left on device"
    assert personaliser.serving is tuned and personaliser.unsaved is tuned  # predictions go on
    assert not path.exists() and sorted(p.name for p in fs.path.iterdir()) == ["filler"]
    fs.free()
    fs.remount("ro")
    with pytest.raises(PersonalStorageFault) as refused:
        personaliser.save()
    assert refused.value.fault == "read_only"
    fs.remount("rw")
    assert personaliser.save() and personaliser.unsaved is None
    assert PersonalStore(path).load() == tuned
    assert not personaliser.save()  # nothing left to write


def test_personal_weights_that_cannot_be_written_for_another_reason_are_logged_once_and_serve_from_memory(
    world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / PERSONAL_FILE  # no such directory
    personaliser = Personaliser(PersonalisationSettings(True, EPOCHS), PersonalStore(path), SEED)
    personaliser.installed(round_manifest(world["trainer"], world["global"], 12), world["global"])
    tuned = personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    with caplog.at_level(logging.WARNING, "fedge.agent"):
        assert not personaliser.save()
        assert not personaliser.save()  # given up: not retried, not logged again
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write personal weights {path}: No such file or directory; the personal weights serve "
        "from memory until a restart"
    ]
    assert personaliser.serving is tuned and personaliser.unsaved is None


def test_the_agent_counts_and_logs_a_refused_personal_weights_write_like_its_other_state_files(
    world: dict[str, Any],
    tmp_path: Path,
    har_model_dir: Path,
    tiny_fs: list[TinyFs],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = create_fleet(tmp_path / "fleet", FLEET, har_model_dir, "mqtt://127.0.0.1:9", {DEVICE: 9}, {})
    env = {"FEDGE_AGENT__PERSONALISATION__ENABLED": "true"}
    config = load_agent_config(fleet.agent_configs[DEVICE], env)
    fs = TinyFs(config.state_dir, "4m")
    tiny_fs.append(fs)
    train = world["train"]
    service = AgentService(build_agent(config, ProvidedData(lambda task: train)))
    personaliser = service.personal
    assert personaliser is not None
    personaliser.installed(round_manifest(world["trainer"], world["global"], 12), world["global"])
    personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    fs.fill()
    with caplog.at_level(logging.INFO, "fedge.agent"):
        service._save_personal()
        service._save_personal()  # the retry fails too: counted, not logged again
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [service.last_error]
        assert errors[0].startswith(
            f"[agent] state_dir {config.state_dir} is full (cannot write personal weights "
            f"{config.state_dir / PERSONAL_FILE}: No space left on device): free space"
        )
        assert service.state_dir_watch.report()["failed_writes"] == {"full": 2, "read_only": 0}
        assert personaliser.unsaved is not None
        fs.free()
        service._save_personal()
    assert service.last_error is None and personaliser.unsaved is None
    assert "can be written again (2 write(s) had failed)" in caplog.text
    assert PersonalStore(config.state_dir / PERSONAL_FILE).load() == personaliser.weights


def test_the_insight_is_marked_personal_with_both_versions_and_matches_the_contract(
    world: dict[str, Any], har_task: TaskSpec
) -> None:
    channel = load_document().channels["insight"]
    topic = f"fedge/v1/{FLEET}/insight/{DEVICE}"
    window = LiveWindow(
        np.zeros(har_task.input_dim, np.float32), 10**18, 10**18 + 2 * 10**9, har_task.features
    )
    classes = har_task.label.classes or ()
    prediction = Prediction(label="PEN", class_index=0, probabilities=dict.fromkeys(classes, 1 / 7))
    manifest = round_manifest(world["trainer"], world["global"], 12)
    personal = insight_payload(
        device_id=DEVICE,
        fleet=FLEET,
        window=window,
        published_at=1e9,
        manifest=manifest,
        prediction=prediction,
        personal_version=11,
        personalised=True,
    )
    shared = insight_payload(  # personalisation on, nothing fine-tuned yet: the global model
        device_id=DEVICE,
        fleet=FLEET,
        window=window,
        published_at=1e9,
        manifest=manifest,
        prediction=prediction,
        personalised=True,
    )
    plain = insight_payload(  # personalisation off: the document as before it
        device_id=DEVICE,
        fleet=FLEET,
        window=window,
        published_at=1e9,
        manifest=manifest,
        prediction=prediction,
    )
    assert (personal["personal"], personal["personal_version"], personal["model"]["version"]) == (
        True,
        11,
        12,
    )
    assert (shared["personal"], shared["personal_version"]) == (False, None)
    assert plain == {k: v for k, v in shared.items() if k not in ("personal", "personal_version")}
    for doc in (personal, shared, plain):
        channel.validate(topic, json.dumps(doc).encode())
    for broken in (
        {**personal, "personal_version": None},  # personal, but from which version?
        {**shared, "personal_version": 11},  # a version on a global prediction
        {**personal, "personal": "yes"},
        {**personal, "personal_version": 0},
    ):
        with pytest.raises(AssertionError):
            channel.validate(topic, json.dumps(broken).encode())


def test_on_change_publishes_again_when_the_personal_weights_change() -> None:
    policy = InsightPolicy(InsightSettings(min_interval_s=0.0))
    walking = Prediction(label="ABD", class_index=1, probabilities={"ABD": 1.0})
    assert policy.after_inference(walking, 12, None) is None
    policy.published(1.0, 0.5, walking, 12, None)
    assert policy.after_inference(walking, 12, None) == "unchanged"
    assert policy.after_inference(walking, 12, 11) is None  # personal weights arrived: news
    policy.published(2.0, 1.5, walking, 12, 11)
    assert policy.last is not None and policy.last["personal_version"] == 11
    assert policy.after_inference(walking, 12, 11) == "unchanged"
    assert policy.after_inference(walking, 12, 12) is None  # the fine-tune on v12 replaced them


def test_the_device_status_reports_personalisation_and_matches_the_contract() -> None:
    from fedge.protocol.statuses import device_status

    channel = load_document().channels["deviceStatus"]
    topic = f"fedge/v1/{FLEET}/status/{DEVICE}"
    report = {
        "personal_version": 12,
        "epochs": 5,
        "trained_examples": 137,
        "seconds": 0.0012,
        "metric": "accuracy",
        "holdout_samples": 60,
        "global": 0.4167,
        "personal": 1.0,
    }
    fresh = dict.fromkeys(report, None) | {"epochs": 5}  # enabled, nothing fine-tuned yet
    for value in (report, fresh, None):
        channel.validate(topic, json.dumps(device_status(DEVICE, "idle", personalisation=value)).encode())
    for broken in (
        {**report, "extra": 1},
        {k: v for k, v in report.items() if k != "global"},
        {**report, "metric": "f1"},
        {**report, "epochs": 0},
    ):
        with pytest.raises(AssertionError):
            channel.validate(
                topic, json.dumps(device_status(DEVICE, "idle", personalisation=broken)).encode()
            )


# --- configuration ------------------------------------------------------------------------------


def _config(tmp_path: Path, har_model_dir: Path, table: str, env: dict[str, str] | None = None) -> Any:
    fleet = create_fleet(tmp_path / "fleet", FLEET, har_model_dir, "mqtt://127.0.0.1:9", {DEVICE: 9}, {})
    path = fleet.agent_configs[DEVICE]
    path.write_text(path.read_text() + table)
    return load_agent_config(path, env or {})


def test_personalisation_is_off_by_default_and_its_keys_come_from_the_file_or_the_environment(
    tmp_path: Path, har_model_dir: Path
) -> None:
    assert _config(tmp_path / "a", har_model_dir, "").personalisation == PersonalisationSettings(False, 5)
    on = _config(tmp_path / "b", har_model_dir, "\n[personalisation]\nenabled = true\nepochs = 3\n")
    assert on.personalisation == PersonalisationSettings(True, 3)
    env = {"FEDGE_AGENT__PERSONALISATION__ENABLED": "true", "FEDGE_AGENT__PERSONALISATION__EPOCHS": "1000"}
    assert _config(tmp_path / "c", har_model_dir, "", env).personalisation == PersonalisationSettings(
        True, 1000
    )


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("epochs = 0", "[personalisation] epochs must be an integer in 1..1000, got 0"),
        ("epochs = 1001", "[personalisation] epochs must be an integer in 1..1000, got 1001"),
        ('epochs = "5"', "[personalisation] epochs must be an integer in 1..1000, got '5'"),
        ("epochs = 2.5", "[personalisation] epochs must be an integer in 1..1000, got 2.5"),
        ('enabled = "yes"', "[personalisation] enabled must be true or false"),
        ("epoch = 5", "[personalisation] unknown keys ['epoch']; allowed: ['enabled', 'epochs']"),
    ],
)
def test_bad_personalisation_values_are_one_exact_error(
    tmp_path: Path, har_model_dir: Path, table: str, error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _config(tmp_path, har_model_dir, f"\n[personalisation]\n{table}\n")
    assert str(raised.value) == error


def test_fedge_agent_run_says_a_bad_personalisation_value_in_one_line(
    tmp_path: Path, har_model_dir: Path
) -> None:
    fleet = create_fleet(tmp_path / "fleet", FLEET, har_model_dir, "mqtt://127.0.0.1:9", {DEVICE: 9}, {})
    path = fleet.agent_configs[DEVICE]
    path.write_text(path.read_text() + "\n[personalisation]\nenabled = true\nepochs = -1\n")
    done = fedge("agent", "run", "--config", str(path), timeout=120)
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip().splitlines() == [
        "fedge: error: [personalisation] epochs must be an integer in 1..1000, got -1"
    ]


@pytest.mark.parametrize(
    ("metric", "global_value", "personal_value", "serves"),
    [
        ("accuracy", 0.90, 0.95, True),
        ("accuracy", 0.90, 0.90, True),  # not worse
        ("accuracy", 0.90, 0.85, False),
        ("mse", 0.40, 0.30, True),
        ("mse", 0.40, 0.40, True),
        ("mse", 0.40, 0.50, False),
    ],
)
def test_personal_weights_that_score_worse_than_the_global_ones_do_not_serve(
    world: dict[str, Any],
    tmp_path: Path,
    metric: str,
    global_value: float,
    personal_value: float,
    serves: bool,
) -> None:
    manifest = round_manifest(world["trainer"], world["global"], 12)
    personaliser = Personaliser(
        PersonalisationSettings(True, EPOCHS), PersonalStore(tmp_path / PERSONAL_FILE), SEED
    )
    personaliser.installed(manifest, world["global"])
    tuned = personaliser.fine_tune(world["trainer"], world["train"], world["holdout"])
    personaliser.weights = replace(
        tuned, evaluation=PersonalEvaluation(metric, 50, global_value, personal_value)
    )
    assert (personaliser.serving is personaliser.weights) is serves
    assert personaliser.serving is None or serves
    # Without a held-out part there is nothing to judge them by: they serve.
    personaliser.weights = replace(tuned, evaluation=None)
    assert personaliser.serving is personaliser.weights


def test_the_personal_weights_file_keeps_every_field(world: dict[str, Any]) -> None:
    weights = tune(world, round_manifest(world["trainer"], world["global"], 7, generation=3))
    again = from_bytes(to_bytes(weights))
    assert again == weights and again.values.tobytes() == weights.values.tobytes()
    no_holdout = replace(weights, evaluation=None)
    assert from_bytes(to_bytes(no_holdout)) == no_holdout


def test_the_personal_examples_of_docs_bms_md_match_the_asyncapi_document() -> None:
    """bms.md shows a personalised device's status and insight keys as fragments: each, put into
    the page's full example of its channel, must match the contract."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "bms.md").read_text()
    full = dict(re.findall(r"<!-- channel: (\w+) -->\n```json\n(.*?)```", text, re.S))
    fragments = re.findall(r"<!-- personal example: (\w+) -->\n```json\n(.*?)```", text, re.S)
    assert sorted(k for k, _ in fragments) == ["deviceStatus", "insight"]
    doc = load_document()
    for key, fragment in fragments:
        example = {**json.loads(full[key]), **json.loads(fragment)}
        channel = doc.channels[key]
        topic = channel.address.replace("{fleet}", "demo").replace("{device_id}", "watch-01")
        channel.validate(topic, json.dumps(example).encode())
        if key == "insight":
            assert (example["personal"], example["personal_version"]) == (True, example["model"]["version"])
        else:
            report = example["personalisation"]
            assert (
                report["personal"] > report["global"]
                and report["personal_version"] == example["model_version"]
            )


def test_a_failing_data_source_or_fine_tune_is_one_log_line_and_never_stops_the_agent(
    world: dict[str, Any], tmp_path: Path, har_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = create_fleet(tmp_path / "fleet", FLEET, har_model_dir, "mqtt://127.0.0.1:9", {DEVICE: 9}, {})
    config = load_agent_config(fleet.agent_configs[DEVICE], {"FEDGE_AGENT__PERSONALISATION__ENABLED": "true"})
    feeds: list[Any] = []

    def source(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return feeds.pop(0)() if feeds else (np.empty((0, task.input_dim), np.float32), np.empty(0, np.int32))

    def broken() -> tuple[np.ndarray, np.ndarray]:
        raise OSError("the sample store is gone")

    x, y = world["train"]
    wrong = (np.ones((x.shape[0], x.shape[1] + 1), np.float32), y)  # one feature too many
    service = AgentService(build_agent(config, ProvidedData(source)))
    personaliser = service.personal
    assert personaliser is not None
    service.trainer = world["trainer"]
    personaliser.installed(round_manifest(world["trainer"], world["global"], 12), world["global"])
    feeds.extend([broken, lambda: wrong])
    with caplog.at_level(logging.WARNING, "fedge.agent"):
        service._personalise()  # the source raises: logged, looked at again later
        assert personaliser.due() and service._personal_retry_at > 0
        service._personal_retry_at = 0.0
        service._personalise()  # the fine-tune raises: logged, not retried on this global model
        assert not personaliser.due() and personaliser.serving is None
        service._personalise()
    assert [r.getMessage() for r in caplog.records] == [
        "personalisation: the local data could not be read (OSError: the sample store is gone)",
        caplog.records[1].getMessage(),
    ]
    assert "\n" not in caplog.records[1].getMessage()
    assert caplog.records[1].getMessage().startswith("personalisation: fine-tuning global v12 failed (")
    assert (
        caplog.records[1]
        .getMessage()
        .endswith("); predictions stay on the global model until the next global model")
    )
    assert world["trainer"].get_weights().tobytes() == world["global"].tobytes()  # global again
    assert service.last_error is None


def test_the_table_of_docs_personalisation_md_is_the_benchmarks() -> None:
    """docs/personalisation.md shows the table bench_personalisation.py wrote to its JSON."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    report = json.loads((docs / "results" / "personalisation.json").read_text())
    page = (docs / "personalisation.md").read_text()
    assert report["benchmark"] == "personalisation" and report["table"]
    assert "\n".join(report["table"]) in page
    for split in ("random", "blocked"):
        means = report["results"][split]["checkpoints"][str(report["rounds"])]
        assert f"| {split} | **mean, fleet** |  | {means['mean_global']:.3f} |" in page
