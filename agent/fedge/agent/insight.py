"""Live predictions for building-management systems: ``insight/{device_id}`` (``docs/protocol.md``,
"Predictions (insight)").

The device runs the *verified global model* (the weights of the newest manifest it accepted and
whose blobs it checked, never the weights it trained for its federated update) on its live windows
(:mod:`fedge.agent.live`) with the LiteRT interpreter, and publishes the prediction retained,
QoS 1, rate-limited as ``[insight]`` says (:class:`fedge.agent.config.InsightSettings`). With
``[personalisation]`` the device predicts with its personal weights instead, once it has them
(fine-tuned from a global model of the same model and generation, :mod:`fedge.agent.personal`),
and the payload says so: ``"personal": true`` and the global version they came from.

Three parts:

- :class:`InsightPolicy` (pure): decides for each window whether it is published or skipped, and
  why, from the time (an argument), the settings and what was published last.
- :class:`InsightModel`: the global model in an interpreter of its own, separate from the
  trainer's, so that training never moves the weights predictions are made with (and the
  trainer's interpreter, which is not thread-safe, is never shared).
- :class:`InsightPublisher`: the worker thread's step: takes the source's windows, asks the
  policy, predicts, builds the payload (:func:`insight_payload`) and hands it to a publish
  function; counts every skipped window by reason and logs the first of each reason with the
  setting to change. Its :meth:`InsightPublisher.report` is ``insights`` in the device status.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.agent.config import InsightSettings
from fedge.agent.live import LiveWindow, LiveWindows
from fedge.agent.trainer import LiteRTTrainer
from fedge.protocol.errors import FedgeError
from fedge.protocol.rollout import RolloutDecision
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.statuses import INSIGHT_SCHEMA  # the payload's "schema"
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_from_bytes

log = logging.getLogger("fedge.agent.insight")

#: Why a live window was not published, in the order they are checked (``skipped`` in the
#: ``insights`` of the device status counts each):
#:
#: - ``off``: ``[insight] publish = "off"``;
#: - ``overflow``: the window was dropped before the worker saw it (it was busy, e.g. training,
#:   while more windows arrived than the source keeps);
#: - ``no_model``: no verified global model yet (or only the moments round's untrained one);
#: - ``stale``: the window ended more than ``stale_after_s`` before the device's clock;
#: - ``offline``: not connected to the fleet's broker;
#: - ``rate_limited``: within ``min_interval_s`` of the last publication;
#: - ``error``: the model could not be loaded or run on the window (the first is logged);
#: - ``unchanged``: ``publish = "on_change"`` and neither the prediction (beyond
#:   ``min_change``) nor the model changed since the last publication.
SKIP_REASONS: tuple[str, ...] = (
    "off",
    "overflow",
    "no_model",
    "stale",
    "offline",
    "rate_limited",
    "error",
    "unchanged",
)

#: What to do about each reason, logged (with the details) the first time it happens.
_ADVICE = {
    "off": '[insight] publish = "off": no predictions are made; set it to "on_change" or '
    '"every_window" to publish them on insight/{device_id}',
    "overflow": "the worker was busy (training) while windows arrived; only the newest are kept "
    "and the rest are not predicted on (nothing to configure)",
    "no_model": "no verified, trained global model yet: predictions start with the first "
    "train-phase manifest this device verifies (nothing to configure)",
    "stale": "the newest live window is older than [insight] stale_after_s; check the device's "
    "clock and its sensor feed, or raise stale_after_s (0 = never stale, for replayed historical "
    "data)",
    "offline": "not connected to the fleet's broker; predictions resume when it reconnects",
    "rate_limited": "at most one prediction is published per [insight] min_interval_s; lower it "
    "(0 = no limit) to publish more often",
    "error": "the global model could not be loaded or run on a live window",
    "unchanged": '[insight] publish = "on_change": a prediction equal to the last published one '
    '(for regression: within [insight] min_change) is not published; set publish = "every_window" '
    "to publish every window, or lower min_change",
}
_ROUTINE = frozenset({"overflow", "no_model", "offline", "rate_limited", "unchanged", "off"})


class InsightError(FedgeError):
    """A prediction cannot be made: the model does not fit the window, or its output is unusable."""


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one window: a class (with every class's probability) or a value."""

    label: str | None = None
    class_index: int | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None
    units: str | None = None

    def key(self) -> str | float | None:
        """What ``on_change`` compares: the class name, or the value."""
        return self.label if self.label is not None else self.value

    def to_dict(self) -> dict[str, Any]:
        if self.label is not None:
            return {"label": self.label, "class_index": self.class_index, "probabilities": self.probabilities}
        return {"value": self.value, "units": self.units}


def prediction_from_output(output: np.ndarray, task: TaskSpec, units: str | None) -> Prediction:
    """A :class:`Prediction` from the model's ``infer`` output for one window: class
    probabilities (classification; the label is the most probable class, ties to the smallest
    index) or the predicted value (regression)."""
    out = np.asarray(output, dtype=np.float64).reshape(-1)
    if out.shape != (task.output_dim,):
        raise InsightError(f"the model gave {out.shape[0]} output(s), the task has {task.output_dim}")
    if not np.all(np.isfinite(out)):
        raise InsightError("the model's output is not finite (NaN or infinity)")
    classes = task.label.classes
    if classes is None:
        return Prediction(value=float(out[0]), units=units)
    index = int(np.argmax(out))
    return Prediction(
        label=classes[index],
        class_index=index,
        probabilities={name: float(p) for name, p in zip(classes, out, strict=True)},
    )


def insight_payload(
    *,
    device_id: str,
    fleet: str,
    window: LiveWindow,
    published_at: float,
    manifest: RoundManifest,
    prediction: Prediction,
    personal_version: int | None = None,
    personalised: bool = False,
    rollout: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The JSON document published on ``insight/{device_id}`` (``docs/protocol.md``).
    ``model`` is the installed global model; ``personal_version``, when the prediction was made
    with personal weights, the global version they were fine-tuned from. A device with
    ``[personalisation]`` on (``personalised``) says which weights it used in every prediction
    (``personal``, ``personal_version``); without it the document is as before personalisation
    (no such keys: the global model). ``rollout``: the promoted version whose weights made the
    prediction and the decision that promoted it (``[rollout]`` gate, docs/rollout.md); absent
    when the installed model's own weights did."""
    task = manifest.model_manifest.task
    return (
        {
            "schema": INSIGHT_SCHEMA,
            "device_id": device_id,
            "fleet": fleet,
            "window": {"start": window.start_ns / 1e9, "end": window.end_ns / 1e9},
            "published_at": published_at,
            "model": {
                "version": manifest.version,
                "generation": manifest.generation,  # signed in the manifest (absent there: 1)
                "round_id": manifest.round_id if manifest.phase != "final" else None,  # no round open
                "sha256": manifest.model_sha256,
            },
            "task": {"name": task.name, "kind": task.model.kind},
            "prediction": prediction.to_dict(),
            "source": {"edgex_device": window.edgex_device, "resources": list(window.spec.resources)},
        }
        | (
            {"personal": personal_version is not None, "personal_version": personal_version}
            if personalised or personal_version is not None
            else {}
        )
        | ({"rollout": rollout} if rollout is not None else {})
    )


class InsightPolicy:
    """Which live windows are published (pure: the time is an argument).

    For each window, :meth:`before_inference` is asked first (so a window that cannot be
    published costs no inference), then, with the prediction, :meth:`after_inference`; a
    window that passes both is published and :meth:`published` records it. Every skipped
    window is counted by reason (:data:`SKIP_REASONS`) with :meth:`skip`.
    """

    def __init__(self, settings: InsightSettings) -> None:
        self.settings = settings
        self.published_total = 0
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.last: dict[str, Any] | None = None
        self._last_at: float | None = None
        self._last_key: tuple[int, int | None, int | None, str | float | None] | None = None

    def before_inference(
        self, window_end_s: float, now: float, have_model: bool, connected: bool
    ) -> str | None:
        """The reason the window is skipped before any inference, or None to go on."""
        s = self.settings
        if s.publish == "off":
            return "off"
        if not have_model:
            return "no_model"
        if s.stale_after_s > 0 and now - window_end_s > s.stale_after_s:
            return "stale"
        if not connected:
            return "offline"
        if self._last_at is not None and 0 <= now - self._last_at < s.min_interval_s:
            return "rate_limited"
        return None

    def after_inference(
        self,
        prediction: Prediction,
        model_version: int,
        personal_version: int | None = None,
        rollout_version: int | None = None,
    ) -> str | None:
        """``unchanged`` when ``on_change`` has nothing new to say, else None (publish).
        ``rollout_version``: the promoted version whose weights predicted (docs/rollout.md)."""
        if self.settings.publish != "on_change" or self._last_key is None:
            return None
        last_version, last_personal, last_rollout, last = self._last_key
        if (last_version, last_personal, last_rollout) != (model_version, personal_version, rollout_version):
            return None  # a new global, promoted or personal model: its first prediction is news
        new = prediction.key()
        if isinstance(new, float) and isinstance(last, float):
            return "unchanged" if abs(new - last) <= self.settings.min_change else None
        return "unchanged" if new == last else None

    def skip(self, reason: str, count: int = 1) -> bool:
        """Counts skipped windows; True the first time ``reason`` is counted."""
        if reason not in self.skipped:
            raise ValueError(f"unknown insight skip reason {reason!r}")
        first = self.skipped[reason] == 0
        self.skipped[reason] += count
        return first

    def published(
        self,
        now: float,
        window_end_s: float,
        prediction: Prediction,
        model_version: int,
        personal_version: int | None = None,
        rollout_version: int | None = None,
    ) -> None:
        self.published_total += 1
        self._last_at = now
        self._last_key = (model_version, personal_version, rollout_version, prediction.key())
        last: dict[str, Any] = {"time": now, "window_end": window_end_s, "model_version": model_version}
        if personal_version is not None:
            last["personal_version"] = personal_version
        if prediction.label is not None:
            last["label"] = prediction.label
        else:
            last["value"] = prediction.value
        self.last = last

    def report(self) -> dict[str, Any]:
        """``insights`` in the device status."""
        return {
            "publish": self.settings.publish,
            "published": self.published_total,
            "skipped": dict(self.skipped),
            "last": dict(self.last) if self.last is not None else None,
        }


class InsightModel:
    """The verified global model, for predictions only: an interpreter of its own.

    :meth:`load` is called with every manifest whose blobs the device verified (the same
    ``Load`` the trainer gets); a model blob builds a new interpreter, the weights and the
    normalisation are set each time. A ``moments``-phase manifest carries the untrained initial
    weights, so after one there is no model to predict with (``no_model``) until a trained one.
    :meth:`personalise` swaps the global weights for personal ones (and back).
    """

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        self.manifest: RoundManifest | None = None
        #: The global version the weights in use were fine-tuned from; None: the global weights.
        self.personal_version: int | None = None
        self._model: bytes | None = None
        self._interpreter: LiteRTTrainer | None = None
        self._global_weights: np.ndarray | None = None
        #: The aggregator's newest promotion and its weights (``fedge.agent.rollout``).
        self._promoted: tuple[RolloutDecision, bytes] | None = None
        #: The promoted version predictions use now; None: the loaded global weights (or personal).
        self.rollout: RolloutDecision | None = None

    def promote(self, decision: RolloutDecision | None, weights: bytes | None) -> None:
        """Predictions use ``weights``, the promoted version of ``decision``, whenever they belong
        to the loaded model and generation (None: the loaded global weights again)."""
        self._promoted = (decision, weights) if decision is not None and weights is not None else None
        if self.personal_version is None:
            self._serve()

    def _serve(self) -> None:
        """Sets the global weights predictions use: the promoted ones if they fit, else the loaded."""
        interpreter, manifest, weights = self._interpreter, self.manifest, self._global_weights
        self.rollout = None
        if interpreter is None or weights is None:
            return
        promoted = self._promoted
        if manifest is not None and promoted is not None:
            decision, blob = promoted
            fits = (
                decision.model_sha256 == manifest.model_sha256 and decision.generation == manifest.generation
            )
            if fits:
                if decision.weights_sha256 != manifest.weights_sha256:
                    weights = weights_from_bytes(blob, manifest.model_manifest.parameter_count)
                self.rollout = decision
        interpreter.set_weights(weights)

    def load(self, manifest: RoundManifest, model: bytes | None, weights: bytes) -> None:
        self.manifest = None
        self.personal_version = None
        if model is not None:
            self._model = model
        if self._interpreter is None or self._interpreter.manifest.model_sha256 != manifest.model_sha256:
            self._interpreter = None
            if self._model is None or hashlib.sha256(self._model).hexdigest() != manifest.model_sha256:
                raise InsightError(
                    f"the model {manifest.model_sha256[:12]} of manifest v{manifest.version} is not at hand"
                )
            self._interpreter = LiteRTTrainer(self._model, manifest.model_manifest, self.runtime)  # type: ignore[arg-type]
        interpreter = self._interpreter
        interpreter.normalisation = manifest.normalisation
        self._global_weights = weights_from_bytes(weights, manifest.model_manifest.parameter_count)
        if manifest.phase != "moments":
            self.manifest = manifest
        self._serve()

    def personalise(self, weights: np.ndarray | None, version: int | None) -> None:
        """Predicts with ``weights``, personal weights fine-tuned from global ``version`` of the
        loaded model and generation (the caller checks: :meth:`fedge.agent.personal.PersonalWeights.refusal`),
        or with the loaded global weights again for None."""
        interpreter, global_weights = self._interpreter, self._global_weights
        if self.manifest is None or interpreter is None or global_weights is None:
            raise InsightError("no verified global model loaded to personalise")
        if weights is None or version is None:
            self.personal_version = None
            self._serve()
            return
        self.personal_version = None  # until the weights are in
        self.rollout = None
        interpreter.set_weights(np.asarray(weights, np.float32))
        self.personal_version = version

    def predict(self, window: LiveWindow) -> Prediction:
        manifest, interpreter = self.manifest, self._interpreter
        if manifest is None or interpreter is None:
            raise InsightError("no verified global model loaded")
        task = manifest.model_manifest.task
        if window.spec != task.features:
            raise InsightError(
                f"the global model's task {task.name!r} reads other features than this device's live "
                "windows; update the device's task spec ([data] task)"
            )
        output = interpreter.predict(np.asarray(window.features, dtype=np.float32).reshape(1, -1))
        return prediction_from_output(output[0], task, window.label_units)


#: Publishes ``(topic, payload)`` retained with QoS 1; False if it could not be handed over.
PublishFn = Callable[[str, bytes], bool]


class InsightPublisher:
    """The agent's insight step (its worker thread): see the module docstring. Never raises."""

    def __init__(
        self,
        settings: InsightSettings,
        device_id: str,
        fleet: str,
        topic: str,
        runtime: str,
        publish: PublishFn,
        on_published: Callable[[dict[str, Any], float], None] | None = None,
        personalised: bool = False,
    ) -> None:
        self.settings = settings
        #: ``[personalisation]`` is on: every prediction says whether personal weights made it.
        self.personalised = personalised
        #: Called with each published payload and the time (Home Assistant discovery, write-back).
        self.on_published = on_published
        self.device_id = device_id
        self.fleet = fleet
        self.topic = topic
        self.publish = publish
        self.policy = InsightPolicy(settings)
        self.model = InsightModel(runtime)
        self.load_error: str | None = None

    @property
    def task(self) -> TaskSpec | None:
        """The verified model's task (what a source builds windows for), None before one."""
        manifest = self.model.manifest
        return manifest.model_manifest.task if manifest is not None else None

    def load(self, manifest: RoundManifest, model: bytes | None, weights: bytes) -> None:
        """A verified manifest's model and weights (``Load``); a failure is counted as
        ``error`` on the next windows, never raised into the round."""
        if self.settings.publish == "off":
            return
        try:
            self.model.load(manifest, model, weights)
            self.load_error = None
        except Exception as exc:  # the round goes on whatever the prediction model does
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "insight: cannot load the model of manifest v%d: %s", manifest.version, self.load_error
            )

    def personalise(self, weights: np.ndarray | None, version: int | None) -> None:
        """Predictions from now on use these personal weights (None: the global ones again); a
        failure is logged and predictions go on with the global weights, never raised."""
        if self.settings.publish == "off" or self.model.manifest is None:
            return
        try:
            self.model.personalise(weights, version)
        except Exception as exc:  # the round goes on whatever the prediction model does
            log.warning("insight: cannot predict with the personal weights of v%s: %s", version, exc)
            with contextlib.suppress(Exception):
                self.model.personalise(None, None)

    def process(self, batch: LiveWindows, now: float, connected: bool) -> None:
        """Decides, predicts and publishes for each window of ``batch`` (oldest first)."""
        if batch.dropped:
            self._skip("overflow", f"{batch.dropped} window(s) dropped", batch.dropped)
        for window in batch.windows:
            self._one(window, now, connected)

    def _one(self, window: LiveWindow, now: float, connected: bool) -> None:
        end_s = window.end_ns / 1e9
        have_model = self.model.manifest is not None or self.load_error is not None
        reason = self.policy.before_inference(end_s, now, have_model, connected)
        if reason is not None:
            detail = ""
            if reason == "stale":
                detail = (
                    f"the window ended {now - end_s:.0f} s before the device's clock, over "
                    f"[insight] stale_after_s = {self.settings.stale_after_s:g}"
                )
            elif reason == "rate_limited":
                detail = f"[insight] min_interval_s = {self.settings.min_interval_s:g}"
            self._skip(reason, detail)
            return
        manifest = self.model.manifest
        try:
            if self.load_error is not None or manifest is None:
                raise InsightError(f"the global model could not be loaded: {self.load_error}")
            prediction = self.model.predict(window)
            personal = self.model.personal_version
            promoted = self._rollout_key()
            rollout_version = promoted["version"] if promoted is not None else None
            reason = self.policy.after_inference(prediction, manifest.version, personal, rollout_version)
            if reason is not None:
                self._skip(reason, f"prediction {prediction.key()!r} of model v{manifest.version}")
                return
            payload = insight_payload(
                device_id=self.device_id,
                fleet=self.fleet,
                window=window,
                published_at=now,
                manifest=manifest,
                prediction=prediction,
                personal_version=personal,
                personalised=self.personalised,
                rollout=promoted,
            )
            data = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except Exception as exc:  # a bad window or model never ends the worker
            self._skip("error", f"{type(exc).__name__}: {exc}")
            return
        if not self.publish(self.topic, data):
            self._skip("offline", "the MQTT client refused the publication")
            return
        self.policy.published(now, end_s, prediction, manifest.version, personal, rollout_version)
        if self.policy.published_total == 1:
            log.info(
                "insight: published the first prediction on %s (model v%d)", self.topic, manifest.version
            )
        if self.on_published is not None:
            try:
                self.on_published(payload, now)
            except Exception:  # what acts on a prediction never stops the predictions
                log.exception("insight: acting on a published prediction failed")

    def _rollout_key(self) -> dict[str, int] | None:
        d = self.model.rollout
        if d is None or d.promoted_version is None:
            return None
        return {"version": d.promoted_version, "sequence": d.sequence}

    @property
    def predicting_version(self) -> int | None:
        """The global version whose weights predictions use (the promoted one, else the loaded);
        None before a model (personal weights: the global version they came from)."""
        m = self.model
        if m.manifest is None:
            return None
        if m.personal_version is not None:
            return m.personal_version
        if m.rollout is not None and m.rollout.promoted_version is not None:
            return m.rollout.promoted_version
        return m.manifest.version

    def promote(self, decision: RolloutDecision | None, weights: bytes | None) -> None:
        """The aggregator's promotion (``fedge.agent.rollout``); a failure is logged and
        predictions go on with the loaded global weights, never raised."""
        try:
            self.model.promote(decision, weights)
        except Exception as exc:  # the round goes on whatever the prediction model does
            log.warning("insight: cannot predict with the promoted weights: %s", exc)
            with contextlib.suppress(Exception):
                self.model.promote(None, None)

    def _skip(self, reason: str, detail: str, count: int = 1) -> None:
        if self.policy.skip(reason, count):
            level = logging.INFO if reason in _ROUTINE else logging.WARNING
            log.log(
                level,
                "insight: a prediction was not published (%s%s): %s. Further ones are counted in the "
                "status (insights.skipped.%s), not logged",
                reason,
                f": {detail}" if detail else "",
                _ADVICE[reason],
                reason,
            )

    def report(self) -> dict[str, Any]:
        """``insights`` in the device status: published, skipped by reason, the last one. Read
        from paho's thread too, without a lock: the counters' keys never change and ``last`` is
        replaced whole, so a copy is always consistent enough for a status (and no lock is held
        around ``publish``, which paho calls back under its own mutex)."""
        return self.policy.report()
