"""Personalisation on the device, fine-tune-after-global (``[personalisation]``,
``docs/personalisation.md``).

Each time the device installs a new global model (a verified ``train`` or ``final`` manifest),
and after it has trained and sent its federated update from exactly those global weights, it
fine-tunes a copy of the global weights for ``epochs`` more epochs on the training part of its own
samples and keeps the result as its *personal weights*. Its predictions (``insight/{device_id}``)
use them, marked personal; its federated update never does: the update is computed first, from
the global weights, and the trainer holds the global weights again once the fine-tune is done
(:func:`fine_tune`), so the next round starts from where it would have without personalisation.

Why fine-tune-after-global rather than FedPer or FedRep (a shared body averaged by the fleet, a
personal head that never leaves the device): those change what a device sends (the body only)
and what the aggregator averages, need a model whose manifest splits body from head, and leave
the global head untrained for a device that joins later. Fine-tune-after-global changes nothing
on the wire or in the aggregator, works with any fedge model through its signatures alone
(``set_weights``, ``train``, ``evaluate``, ``get_weights``; ``infer`` for predictions; an
imported model whose trainable part is its head fine-tunes that head), and each personal model
starts again from the newest global one, so it keeps what the fleet learns.

The personal weights are tied to the global model they came from: the model's SHA-256, the
generation, the version and that version's weights blob (:meth:`PersonalWeights.refusal`).
Weights of another model or generation, of a version newer than the installed one, or of the
installed version with other global weights are refused and deleted; weights of an older version
of the same model and generation keep serving until the fine-tune on the new one replaces them
(the insight names the version they came from). They persist in ``<state_dir>/personal.bin``,
replaced atomically; a file that cannot be read back is logged in one line and ignored (the
installed global model is fine-tuned again: nothing the protocol depends on is lost). A state
directory that is full or read-only refuses the write with a
:class:`~fedge.shell.storage_faults.StorageFault` (:class:`PersonalStorageFault`), which the agent
counts and logs like every other state file and retries; meanwhile the weights serve from memory.

Device-side evaluation: right after the fine-tune, the personal weights and the global weights
they came from are both scored on the device's held-out part (the seeded split of ``[data]
holdout_fraction`` that the federated update never trains on either), in the task's metric:
accuracy for classification, mean squared error for regression.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.agent.config import PersonalisationSettings
from fedge.agent.trainer import LiteRTTrainer, ProgressCallback
from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.weights import weights_from_bytes, weights_to_bytes
from fedge.shell.files import OversizedFile, read_bounded, replace_or_remove
from fedge.shell.storage_faults import StorageFault, storage_fault

log = logging.getLogger("fedge.agent")

PERSONAL_FILE = "personal.bin"
MAGIC = b"FEDGEPER"
FORMAT = 1
#: No model has more parameters than a 64 MiB weights blob holds (``fedge.agent.core.MAX_BLOB_BYTES``).
MAX_PARAMETERS = 16 * 1024 * 1024
MAX_HEADER_BYTES = 4096
#: Versions, generations and counts travel in signed 64-bit fields.
MAX_INT = 2**63 - 1
_PREFIX = struct.Struct("<8sII")  # magic, format, header length
#: The fine-tune's shuffling: ``[data] seed``, the model version and this, so it never replays the
#: federated training's order (``[seed, version]``) yet is as reproducible.
SHUFFLE_STREAM = 0x9E50
#: Why stored personal weights do not serve a manifest (:meth:`PersonalWeights.refusal`).
REFUSALS = ("model_changed", "generation_changed", "newer_version", "other_global_weights")
METRICS = ("accuracy", "mse")


class PersonalError(FedgeError):
    """The personal weights file cannot be written, or is not one this agent wrote."""


class PersonalStorageFault(PersonalError, StorageFault):
    """The state directory is full or read-only: the write can succeed later (retried)."""


@dataclass(frozen=True)
class PersonalEvaluation:
    """The personal weights and the global weights they came from, on the held-out part."""

    metric: str  # "accuracy" (classification) or "mse" (regression)
    samples: int
    global_value: float
    personal_value: float

    @property
    def personal_not_worse(self) -> bool:
        """Whether the personal weights score at least as well as the global ones here: a higher
        or equal accuracy, a lower or equal MSE."""
        if self.metric == "mse":
            return self.personal_value <= self.global_value
        return self.personal_value >= self.global_value


@dataclass(frozen=True)
class PersonalWeights:
    """Personal weights (float32, one per trainable parameter) fine-tuned from the global model
    ``model_sha256`` of ``generation`` at ``global_version`` (whose weights blob is
    ``global_weights_sha256``). Compared without ``values`` (an array)."""

    model_sha256: str
    generation: int
    global_version: int
    global_weights_sha256: str
    epochs: int
    trained_examples: int
    seconds: float
    metric: str
    evaluation: PersonalEvaluation | None
    values: np.ndarray = field(compare=False)

    def describe(self) -> str:
        """One log line: where the weights came from, what the fine-tune cost, how they score."""
        ev = self.evaluation
        scores = (
            "nothing held out"
            if ev is None
            else f"{ev.metric} on {ev.samples} held out: global {ev.global_value:.4f}, "
            f"personal {ev.personal_value:.4f}"
        )
        return (
            f"personal weights fine-tuned from global v{self.global_version}: {self.epochs} epoch(s) on "
            f"{self.trained_examples} sample(s) in {self.seconds:.2f} s; {scores}"
        )

    def refusal(self, manifest: RoundManifest) -> str | None:
        """Why these weights cannot serve ``manifest``'s global model (one of :data:`REFUSALS`),
        or None when they can: the same model and generation, and a version no newer than the
        manifest's (the same version only with the same global weights)."""
        if self.model_sha256 != manifest.model_sha256:
            return "model_changed"
        if self.generation != manifest.generation:
            return "generation_changed"
        if self.values.shape != (manifest.model_manifest.parameter_count,):
            return "model_changed"
        if self.global_version > manifest.version:
            return "newer_version"
        if self.global_version == manifest.version and self.global_weights_sha256 != manifest.weights_sha256:
            return "other_global_weights"
        return None


def fine_tune(
    trainer: LiteRTTrainer,
    manifest: RoundManifest,
    global_weights: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    seed: int,
    progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PersonalWeights:
    """``global_weights`` fine-tuned for ``epochs`` on ``train`` (raw features, labels) and both
    scored on ``holdout`` (no evaluation when it is empty). The trainer holds ``global_weights``
    again when this returns or raises, its optimizer state reset (``set_weights``)."""
    trainer.set_weights(global_weights)
    try:
        started = clock()
        trainer.fit(
            train[0],
            train[1],
            epochs=epochs,
            rng=np.random.default_rng([seed, manifest.version, SHUFFLE_STREAM]),
            progress=progress,
        )
        seconds = clock() - started
        personal = trainer.get_weights()
        metric = "accuracy" if trainer.classification else "mse"
        evaluation = None
        if holdout[0].shape[0] > 0:
            mine = _metric(trainer, holdout)
            trainer.set_weights(global_weights)
            evaluation = PersonalEvaluation(metric, int(holdout[0].shape[0]), _metric(trainer, holdout), mine)
    finally:
        trainer.set_weights(global_weights)
    return PersonalWeights(
        model_sha256=manifest.model_sha256,
        generation=manifest.generation,
        global_version=manifest.version,
        global_weights_sha256=manifest.weights_sha256,
        epochs=epochs,
        trained_examples=int(train[0].shape[0]),
        seconds=seconds,
        metric=metric,
        evaluation=evaluation,
        values=personal,
    )


def _metric(trainer: LiteRTTrainer, data: tuple[np.ndarray, np.ndarray]) -> float:
    result = trainer.evaluate(data[0], data[1])
    value = result.accuracy if trainer.classification else result.mse
    if value is None:  # the trainer fills the one its task's kind has
        raise PersonalError("the model's evaluation gave no metric")
    return value


# --- the file ------------------------------------------------------------------------------------


def to_bytes(weights: PersonalWeights) -> bytes:
    ev = weights.evaluation
    header = json.dumps(
        {
            "model_sha256": weights.model_sha256,
            "generation": weights.generation,
            "global_version": weights.global_version,
            "global_weights_sha256": weights.global_weights_sha256,
            "count": int(weights.values.shape[0]),
            "epochs": weights.epochs,
            "trained_examples": weights.trained_examples,
            "seconds": weights.seconds,
            "metric": weights.metric,
            "evaluation": None
            if ev is None
            else {"samples": ev.samples, "global": ev.global_value, "personal": ev.personal_value},
        },
        sort_keys=True,
        allow_nan=False,
    ).encode()
    return _PREFIX.pack(MAGIC, FORMAT, len(header)) + header + weights_to_bytes(weights.values)


_HEADER_KEYS = {
    "model_sha256",
    "generation",
    "global_version",
    "global_weights_sha256",
    "count",
    "epochs",
    "trained_examples",
    "seconds",
    "metric",
    "evaluation",
}


def from_bytes(raw: bytes) -> PersonalWeights:
    """Parses a personal weights file; every size and field is checked before the values are read."""
    if len(raw) < _PREFIX.size:
        raise PersonalError("shorter than its prefix")
    magic, fmt, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC or fmt != FORMAT:
        raise PersonalError(f"not a format-{FORMAT} personal weights file")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(raw):
        raise PersonalError(f"header of {header_len} bytes")
    try:
        h = json.loads(raw[_PREFIX.size : _PREFIX.size + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise PersonalError(f"header is not JSON: {exc}") from None
    if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
        raise PersonalError(f"header must have exactly {sorted(_HEADER_KEYS)}")
    for name in ("model_sha256", "global_weights_sha256"):
        if not isinstance(h[name], str) or len(h[name]) != 64:
            raise PersonalError(f"{name} must be 64 hex digits")
    for name in ("generation", "global_version", "count", "epochs", "trained_examples"):
        _check_int(name, h[name], 0 if name == "trained_examples" else 1)
    if h["metric"] not in METRICS:
        raise PersonalError(f"metric must be one of {list(METRICS)}")
    seconds = _number("seconds", h["seconds"])
    evaluation = _evaluation(h["evaluation"], h["metric"])
    try:
        values = weights_from_bytes(raw[_PREFIX.size + header_len :], h["count"])
    except FedgeError as exc:
        raise PersonalError(str(exc)) from None
    if not np.all(np.isfinite(values)):
        raise PersonalError("values must be finite")
    return PersonalWeights(
        h["model_sha256"],
        h["generation"],
        h["global_version"],
        h["global_weights_sha256"],
        h["epochs"],
        h["trained_examples"],
        seconds,
        h["metric"],
        evaluation,
        values,
    )


def _check_int(name: str, value: Any, lo: int) -> None:
    hi = MAX_PARAMETERS if name == "count" else MAX_INT
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PersonalError(f"{name} must be an integer in {lo}..{hi}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PersonalError(f"{name} must be a finite number >= 0")
    return float(value)


def _evaluation(raw: Any, metric: str) -> PersonalEvaluation | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"samples", "global", "personal"}:
        raise PersonalError("evaluation must be null or have samples, global, personal")
    _check_int("evaluation samples", raw["samples"], 1)
    return PersonalEvaluation(
        metric, raw["samples"], _number("global", raw["global"]), _number("personal", raw["personal"])
    )


class PersonalStore:
    """``<state_dir>/personal.bin``: the personal weights, replaced atomically, or no file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> PersonalWeights | None:
        """The stored personal weights; None (logged) when there are none or they cannot be read."""
        try:
            raw = read_bounded(self.path, _PREFIX.size + MAX_HEADER_BYTES + 4 * MAX_PARAMETERS)
            return None if raw is None else from_bytes(raw)
        except OSError as exc:
            log.warning("personal weights %s not read (%s): fine-tuning again", self.path, exc.strerror)
        except (OversizedFile, PersonalError) as exc:
            log.warning("personal weights %s ignored (%s): fine-tuning again", self.path, exc)
        return None

    def save(self, weights: PersonalWeights | None) -> None:
        """Writes ``weights`` atomically (mode 0600), or removes the file for None. A file that
        cannot be replaced is removed if it can be, so a restart never predicts with weights
        older than the ones in memory."""
        try:
            replace_or_remove(self.path, None if weights is None else to_bytes(weights))
        except OSError as exc:
            found = storage_fault(exc)
            if found is not None:
                raise PersonalStorageFault("personal weights", self.path, *found) from None
            raise PersonalError(f"cannot write personal weights {self.path}: {exc.strerror}") from None


# --- across global models ------------------------------------------------------------------------


class Personaliser:
    """The device's personal weights across global models; the agent's worker drives it (one
    thread; :meth:`report` is read from others, and sees whole objects only).

    :meth:`installed` with every verified global model the trainer loads; :meth:`due` says when
    the installed one has not been fine-tuned yet; :meth:`fine_tune` does it and keeps the result
    in memory; :meth:`save` writes it to the store (again, after a full or read-only state
    directory refused it: :attr:`unsaved`); :meth:`serving` are the weights predictions use.
    """

    def __init__(self, settings: PersonalisationSettings, store: PersonalStore, seed: int) -> None:
        self.settings = settings
        self.store = store
        self.seed = seed
        #: The newest personal weights (perhaps of an older global version than :attr:`manifest`).
        self.weights: PersonalWeights | None = store.load()
        #: The installed global model (None before one, and after a ``moments`` manifest).
        self.manifest: RoundManifest | None = None
        self._global_weights: np.ndarray | None = None
        #: The version whose fine-tune failed: not tried again before the next global model.
        self._failed_version: int | None = None
        #: Personal weights kept in memory that the store has not taken yet (full or read-only).
        self.unsaved: PersonalWeights | None = None

    def installed(self, manifest: RoundManifest, global_weights: np.ndarray) -> str | None:
        """A verified global model was loaded; returns why the kept personal weights were
        refused (and deleted), or None. A ``moments`` manifest's weights are the untrained initial
        ones: nothing is fine-tuned from them, and the kept weights wait for the next model."""
        if manifest.phase == "moments":
            self.manifest = self._global_weights = None
            return None
        self.manifest, self._global_weights = manifest, np.array(global_weights, np.float32, copy=True)
        dropped = self.weights
        reason = dropped.refusal(manifest) if dropped is not None else None
        if dropped is not None and reason is not None:
            self.weights = self.unsaved = None
            try:
                self.store.save(None)
            except PersonalError as exc:
                log.warning("%s", exc)
            return (
                f"personal weights of model {dropped.model_sha256[:12]} generation {dropped.generation} "
                f"v{dropped.global_version} refused ({reason}) for the global model "
                f"{manifest.model_sha256[:12]} generation {manifest.generation} v{manifest.version}: "
                "fine-tuning the new one"
            )
        return None

    @property
    def serving(self) -> PersonalWeights | None:
        """The personal weights predictions use: those kept, once a global model they fit is
        installed, unless they scored worse than the global weights they came from on the
        device's held-out part (then the global model predicts: a fine-tune that over-fits a
        small local set must not make a room's predictions worse). Without a held-out part
        there is nothing to judge them by, and they serve."""
        w = self.weights
        if self.manifest is None or w is None:
            return None
        return w if w.evaluation is None or w.evaluation.personal_not_worse else None

    def due(self) -> bool:
        """Whether the installed global model is still to be fine-tuned."""
        m = self.manifest
        if m is None or self._failed_version == m.version:
            return False
        return self.weights is None or self.weights.global_version < m.version

    def fine_tune(
        self,
        trainer: LiteRTTrainer,
        train: tuple[np.ndarray, np.ndarray],
        holdout: tuple[np.ndarray, np.ndarray],
        progress: ProgressCallback | None = None,
    ) -> PersonalWeights:
        """Fine-tunes the installed global model (:func:`fine_tune`) and keeps the result in
        memory (:attr:`unsaved` until :meth:`save`); a failure is not tried again on this global
        model."""
        manifest, global_weights = self.manifest, self._global_weights
        if manifest is None or global_weights is None:
            raise PersonalError("no global model installed to fine-tune")
        self._failed_version = manifest.version
        weights = fine_tune(
            trainer,
            manifest,
            global_weights,
            train,
            holdout,
            epochs=self.settings.epochs,
            seed=self.seed,
            progress=progress,
        )
        self._failed_version = None
        self.weights = self.unsaved = weights
        return weights

    def save(self) -> bool:
        """Writes :attr:`unsaved` to the store; True if it wrote something. A full or read-only
        state directory raises :class:`PersonalStorageFault` and keeps them unsaved (the caller
        counts it and calls again later); any other failure (e.g. permissions) is logged once and
        given up: the weights serve from memory, and a restart fine-tunes again."""
        weights = self.unsaved
        if weights is None:
            return False
        try:
            self.store.save(weights)
        except PersonalStorageFault:
            raise
        except PersonalError as exc:
            self.unsaved = None
            log.warning("%s; the personal weights serve from memory until a restart", exc)
            return False
        self.unsaved = None
        return True

    def report(self) -> dict[str, Any]:
        """``personalisation`` in the device status (``docs/asyncapi.yaml``)."""
        w = self.weights
        ev = w.evaluation if w is not None else None
        return {
            "personal_version": w.global_version if w is not None else None,
            "epochs": self.settings.epochs,
            "trained_examples": w.trained_examples if w is not None else None,
            "seconds": w.seconds if w is not None else None,
            "metric": w.metric if w is not None else None,
            "holdout_samples": ev.samples if ev is not None else (0 if w is not None else None),
            "global": ev.global_value if ev is not None else None,
            "personal": ev.personal_value if ev is not None else None,
        }
