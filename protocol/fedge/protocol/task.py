"""Task specs: what a federated task learns, from which EdgeX resources, with which model.

A task spec is written once (TOML, under ``tasks/``) and read by both sides: the aggregator
builds and converts the model from it, the agent builds its training samples from it. This
module only validates already-parsed data (a ``dict`` from ``tomllib``), so it stays pure;
:func:`parse_task_spec` is the convenience for TOML text.

Validation is strict and names the offending field, because a typo in a spec otherwise shows
up hours later as a silently wrong model on every device of a building.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedge.protocol.errors import TaskSpecError

#: Per-window statistics a task may ask for, in the order fedge documents them.
WINDOW_STATISTICS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "median",
    "rms",
    "range",
    "p10",
    "p25",
    "p75",
    "p90",
    "mad",
)
#: ``statistics = ["raw"]``: a window's features are its readings themselves, not statistics of
#: them, for a model that reads the signal (a 1D CNN). It stands alone: a vector of raw readings
#: with a few statistics appended would have no shape a convolution can read.
RAW_WINDOW = "raw"

ModelKind = Literal["classification", "regression"]
#: ``mlp``: ``fedge model build`` makes the model from ``hidden``; ``imported``: ``fedge model
#: import`` makes it from a trained Keras model, whose layers the model manifest describes.
ModelType = Literal["mlp", "imported"]
MODEL_TYPES: tuple[ModelType, ...] = ("mlp", "imported")
OptimizerName = Literal["sgd", "adam"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch
# Guards against specs that would build absurd models on a gateway or a board.
MAX_FEATURES = 4096
MAX_HIDDEN_UNITS = 4096
MAX_LAYERS = 16
MAX_CLASSES = 1024
MAX_WINDOW = 1_000_000


@dataclass(frozen=True)
class WindowSpec:
    """Windowed features: ``size`` readings per window, a new window every ``step`` readings."""

    size: int
    step: int
    statistics: tuple[str, ...]

    @property
    def raw(self) -> bool:
        """Whether a window's features are its readings themselves (``statistics = ["raw"]``)."""
        return self.statistics == (RAW_WINDOW,)


@dataclass(frozen=True)
class FeatureSpec:
    """The EdgeX resources a sample is built from, and optionally how they are windowed."""

    resources: tuple[str, ...]
    sample_rate_hz: float | None
    window: WindowSpec | None

    @property
    def input_dim(self) -> int:
        """Length of one feature vector (resource-major when windowed)."""
        if self.window is None:
            return len(self.resources)
        per_resource = self.window.size if self.window.raw else len(self.window.statistics)
        return len(self.resources) * per_resource

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the feature vector's entries, e.g. ``accel_x.mean``, or ``accel_x[0]`` (the
        window's oldest reading) for raw windows."""
        if self.window is None:
            return self.resources
        if self.window.raw:
            return tuple(f"{r}[{t}]" for r in self.resources for t in range(self.window.size))
        return tuple(f"{r}.{s}" for r in self.resources for s in self.window.statistics)

    @property
    def raw_shape(self) -> tuple[int, int] | None:
        """``(channels, length)`` of a raw-window input, None for statistics or no window.

        The flat vector is channel-major: ``x[c * length + t]`` is reading ``t`` (oldest first)
        of resource ``c``, so ``x.reshape(-1, channels, length)`` gives the windows back, and a
        transpose to ``(-1, length, channels)`` is what a Keras ``Conv1D`` reads.
        """
        if self.window is None or not self.window.raw:
            return None
        return len(self.resources), self.window.size


@dataclass(frozen=True)
class LabelSpec:
    """The resource that labels a sample: a class name (classification) or a number."""

    resource: str
    classes: tuple[str, ...] | None


@dataclass(frozen=True)
class ModelSpec:
    """A multi-layer perceptron: hidden layer sizes, and whether it classifies or regresses.

    No hidden layers (``hidden = ()``) is a linear model: logistic (softmax) regression for
    classification, linear regression for regression.

    ``type = "imported"``: the model is a user's trained Keras model (``fedge model import``);
    its layers and trainable weights are in the model manifest's ``imported`` section, so the
    task names only its ``kind`` (``hidden`` is empty and ``seed`` unused).
    """

    kind: ModelKind
    hidden: tuple[int, ...]
    seed: int
    type: ModelType = "mlp"


#: The largest FedProx coefficient a task may ask for (Li et al. try 0.001..1; far beyond that the
#: proximal term alone decides every step).
MAX_PROXIMAL_MU = 100.0


@dataclass(frozen=True)
class TrainingSpec:
    """Local training on a device: optimizer, its hyper-parameters, batch size and epochs."""

    optimizer: OptimizerName
    learning_rate: float
    momentum: float
    beta1: float
    beta2: float
    epsilon: float
    batch_size: int
    local_epochs: int
    #: FedProx (Li et al. 2020): ``mu / 2 * ||w - w_global||**2`` added to the local loss, so a
    #: device on skewed data drifts less from the global model. 0 (the default): plain local
    #: training; left out of the canonical form then, so specs and models without it hash alike.
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class TaskSpec:
    """A whole, validated task spec."""

    name: str
    description: str
    features: FeatureSpec
    label: LabelSpec
    model: ModelSpec
    training: TrainingSpec
    _source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def input_dim(self) -> int:
        return self.features.input_dim

    @property
    def output_dim(self) -> int:
        """Number of model outputs: one per class, or a single regression target."""
        return len(self.label.classes) if self.label.classes is not None else 1

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """All layer widths, input to output, e.g. ``(48, 64, 32, 7)``; ``(48, 7)`` when linear.

        An MLP's: an imported model's layers are in its manifest (``ModelManifest.layout``)."""
        return (self.input_dim, *self.model.hidden, self.output_dim)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready, canonical form of the spec (what manifests embed and hash)."""
        raw = asdict(self)
        raw.pop("_source", None)
        # Only the optimizer's own hyper-parameters, so the dict parses back to the same spec.
        irrelevant = ("beta1", "beta2", "epsilon") if self.training.optimizer == "sgd" else ("momentum",)
        for key in irrelevant:
            raw["training"].pop(key)
        if self.training.proximal_mu == 0.0:
            raw["training"].pop("proximal_mu")
        if self.model.type == "imported":  # only what the task says: its layers are the manifest's
            raw["model"] = {"type": "imported", "kind": self.model.kind}
        result: dict[str, Any] = _tuples_to_lists(raw)
        return result

    def sha256(self) -> str:
        """Hash of the canonical form: two specs with the same meaning hash alike."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(v) for v in value]
    return value


def parse_task_spec(text: str) -> TaskSpec:
    """Parse TOML text into a validated :class:`TaskSpec`."""
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        # TOMLDecodeError is a ValueError; so is an integer literal over Python's digit limit,
        # and deeply nested arrays exhaust the parser's recursion.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise TaskSpecError("<toml>", f"not valid TOML: {reason}") from None
    return task_spec_from_dict(data)


def task_spec_from_dict(data: Mapping[str, Any]) -> TaskSpec:
    """Validate a parsed task spec (TOML tables or the JSON form from :meth:`TaskSpec.to_dict`).

    Unknown keys are errors, not warnings: a misspelt ``learing_rate`` must not silently fall
    back to a default.
    """
    if not isinstance(data, Mapping):
        raise TaskSpecError("<root>", "must be a table")
    # Accept both the TOML layout ([task] name=...) and the canonical JSON layout (name=...).
    if "task" not in data and "name" not in data:
        raise TaskSpecError("task", "missing table")
    if "task" in data:
        _only_keys(data, "", {"task", "features", "label", "model", "training"})
        head = _table(data, "task")
        _only_keys(head, "task", {"name", "description"})
        name = _name(head, "task.name")
        description = _str(head, "task.description", default="")
    else:
        _only_keys(data, "", {"name", "description", "features", "label", "model", "training"})
        name = _name(data, "name")
        description = _str(data, "description", default="")
    features = _features(_table(data, "features"))
    model = _model(_table(data, "model"))
    label = _label(_table(data, "label"), model.kind, features)
    training = _training(_table(data, "training"))
    return TaskSpec(name, description, features, label, model, training, dict(data))


def _features(t: Mapping[str, Any]) -> FeatureSpec:
    _only_keys(t, "features", {"resources", "sample_rate_hz", "window"})
    resources = _name_list(t, "features.resources", max_len=MAX_FEATURES)
    rate = t.get("sample_rate_hz")
    if rate is not None:
        rate = _positive_float(t, "features.sample_rate_hz")
    window: WindowSpec | None = None
    if t.get("window") is not None:
        w = _table(t, "window", prefix="features.")
        _only_keys(w, "features.window", {"size", "step", "statistics"})
        size = _int(w, "features.window.size", lo=1, hi=MAX_WINDOW)
        step = _int(w, "features.window.step", lo=1, hi=MAX_WINDOW)
        stats = _str_list(w, "features.window.statistics")
        for s in stats:
            if s not in WINDOW_STATISTICS and s != RAW_WINDOW:
                raise TaskSpecError(
                    "features.window.statistics",
                    f"unknown statistic {s!r}; known: {', '.join(WINDOW_STATISTICS)}; "
                    f"or {RAW_WINDOW!r} alone (the readings themselves)",
                    expected=(*WINDOW_STATISTICS, RAW_WINDOW),
                    found=s,
                )
        if len(set(stats)) != len(stats):
            raise TaskSpecError("features.window.statistics", "lists a statistic twice")
        if RAW_WINDOW in stats and len(stats) > 1:
            raise TaskSpecError(
                "features.window.statistics",
                f"{RAW_WINDOW!r} (the readings themselves) cannot be mixed with statistics; "
                f'use ["{RAW_WINDOW}"] alone or statistics alone',
                expected=[RAW_WINDOW],
                found=list(stats),
            )
        window = WindowSpec(size, step, stats)
    spec = FeatureSpec(resources, rate, window)
    if spec.input_dim > MAX_FEATURES:
        shape = spec.raw_shape
        what = f" ({shape[0]} resources x {shape[1]} raw readings)" if shape is not None else ""
        raise TaskSpecError(
            "features",
            f"{spec.input_dim} features{what} exceed the limit {MAX_FEATURES}",
            expected=f"<= {MAX_FEATURES} features",
            found=spec.input_dim,
        )
    return spec


def _label(t: Mapping[str, Any], kind: ModelKind, features: FeatureSpec) -> LabelSpec:
    _only_keys(t, "label", {"resource", "classes"})
    resource = _name(t, "label.resource")
    if resource in features.resources:
        raise TaskSpecError("label.resource", f"{resource!r} is also an input feature")
    if kind == "classification":
        if "classes" not in t:
            raise TaskSpecError("label.classes", "required for a classification model")
        classes = _str_list(t, "label.classes")
        if len(classes) < 2:
            raise TaskSpecError("label.classes", "needs at least 2 classes")
        if len(classes) > MAX_CLASSES:
            raise TaskSpecError("label.classes", f"more than {MAX_CLASSES} classes")
        if len(set(classes)) != len(classes):
            raise TaskSpecError("label.classes", "lists a class twice")
        return LabelSpec(resource, classes)
    if t.get("classes") is not None:
        raise TaskSpecError("label.classes", "a regression model takes a numeric label, not classes")
    return LabelSpec(resource, None)


def _model(t: Mapping[str, Any]) -> ModelSpec:
    _only_keys(t, "model", {"type", "kind", "hidden", "seed"})
    mtype = _str(t, "model.type", default="mlp")
    if mtype not in MODEL_TYPES:
        raise TaskSpecError(
            "model.type",
            f"unsupported model type {mtype!r}; supported: {', '.join(map(repr, MODEL_TYPES))}",
            expected=MODEL_TYPES,
            found=mtype,
        )
    kind = _str(t, "model.kind")
    if kind not in ("classification", "regression"):
        raise TaskSpecError(
            "model.kind",
            "must be 'classification' or 'regression'",
            expected=("classification", "regression"),
            found=kind,
        )
    if mtype == "imported":
        for key in ("hidden", "seed"):
            if key in t:
                raise TaskSpecError(
                    f"model.{key}",
                    "an imported model's layers and weights come from its Keras model (fedge model "
                    "import); remove the key",
                    expected="no key",
                    found=t[key],
                )
        return ModelSpec(kind, (), 0, "imported")  # type: ignore[arg-type]
    hidden_raw = t.get("hidden")
    # Required even when empty: "hidden = []" (a linear model) is a choice to write down, not
    # what a forgotten key should silently become.
    if not isinstance(hidden_raw, list):
        raise TaskSpecError(
            "model.hidden",
            "must be a list of hidden layer sizes ([] for a linear model)",
            expected=f"a list of integers in 1..{MAX_HIDDEN_UNITS}, or []",
            found=hidden_raw,
        )
    if len(hidden_raw) > MAX_LAYERS:
        raise TaskSpecError("model.hidden", f"more than {MAX_LAYERS} hidden layers")
    hidden: list[int] = []
    for i, h in enumerate(hidden_raw):
        if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_HIDDEN_UNITS:
            raise TaskSpecError(
                f"model.hidden[{i}]",
                f"must be an integer in 1..{MAX_HIDDEN_UNITS}",
                expected=f"an integer in 1..{MAX_HIDDEN_UNITS}",
                found=h,
            )
        hidden.append(h)
    seed = _int(t, "model.seed", lo=0, hi=2**31 - 1, default=0)
    return ModelSpec(kind, tuple(hidden), seed)  # type: ignore[arg-type]


def _training(t: Mapping[str, Any]) -> TrainingSpec:
    _only_keys(
        t,
        "training",
        {
            "optimizer",
            "learning_rate",
            "momentum",
            "beta1",
            "beta2",
            "epsilon",
            "batch_size",
            "local_epochs",
            "proximal_mu",
        },
    )
    optimizer = _str(t, "training.optimizer")
    if optimizer not in ("sgd", "adam"):
        raise TaskSpecError(
            "training.optimizer", "must be 'sgd' or 'adam'", expected=("sgd", "adam"), found=optimizer
        )
    if optimizer == "sgd":
        for key in ("beta1", "beta2", "epsilon"):
            if key in t:
                raise TaskSpecError(f"training.{key}", "applies to 'adam' only")
    elif "momentum" in t:
        raise TaskSpecError("training.momentum", "applies to 'sgd' only")
    lr = _positive_float(t, "training.learning_rate")
    momentum = _unit_float(t, "training.momentum", default=0.0)
    beta1 = _unit_float(t, "training.beta1", default=0.9)
    beta2 = _unit_float(t, "training.beta2", default=0.999)
    epsilon = _positive_float(t, "training.epsilon", default=1e-7)
    batch = _int(t, "training.batch_size", lo=1, hi=65536)
    epochs = _int(t, "training.local_epochs", lo=1, hi=10000)
    mu = _float(t, "training.proximal_mu", default=0.0)
    if not 0.0 <= mu <= MAX_PROXIMAL_MU:
        raise TaskSpecError(
            "training.proximal_mu",
            f"must be in [0, {MAX_PROXIMAL_MU:g}], got {mu}",
            expected=f"[0, {MAX_PROXIMAL_MU:g}]",
            found=mu,
        )
    return TrainingSpec(optimizer, lr, momentum, beta1, beta2, epsilon, batch, epochs, mu)  # type: ignore[arg-type]


# --- small typed accessors, each raising TaskSpecError with the full field path ------------

_MISSING = object()


def _only_keys(t: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in t:
        if key not in allowed:
            shown = str(key) if key else "<empty key>"
            path = f"{where}.{shown}" if where else shown
            raise TaskSpecError(
                path,
                f"unknown key; expected one of: {', '.join(sorted(allowed))}",
                expected=tuple(sorted(allowed)),
                found=key,
            )


def _table(t: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = t.get(key, _MISSING)
    if value is _MISSING:
        raise TaskSpecError(prefix + key, "missing table")
    if not isinstance(value, Mapping):
        raise TaskSpecError(prefix + key, "must be a table")
    return value


def _get(t: Mapping[str, Any], path: str, default: Any) -> Any:
    key = path.rsplit(".", 1)[-1]
    value = t.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise TaskSpecError(path, "missing")
        return default
    return value


def _str(t: Mapping[str, Any], path: str, default: Any = _MISSING) -> str:
    value = _get(t, path, default)
    if not isinstance(value, str):
        raise TaskSpecError(path, "must be a string", expected="a string", found=value)
    return value


def _name(t: Mapping[str, Any], path: str) -> str:
    value = _str(t, path)
    if not _NAME_RE.fullmatch(value):
        raise TaskSpecError(
            path,
            f"{value!r} is not a valid name (letters, digits, _ . -)",
            expected="a name of letters, digits, _ . -",
            found=value,
        )
    return value


def _str_list(t: Mapping[str, Any], path: str) -> tuple[str, ...]:
    value = _get(t, path, _MISSING)
    if not isinstance(value, list) or not value:
        raise TaskSpecError(path, "must be a non-empty list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise TaskSpecError(f"{path}[{i}]", "must be a non-empty string")
    return tuple(value)


def _name_list(t: Mapping[str, Any], path: str, max_len: int) -> tuple[str, ...]:
    names = _str_list(t, path)
    if len(names) > max_len:
        raise TaskSpecError(path, f"more than {max_len} entries")
    for i, n in enumerate(names):
        if not _NAME_RE.fullmatch(n):
            raise TaskSpecError(f"{path}[{i}]", f"{n!r} is not a valid resource name")
    if len(set(names)) != len(names):
        raise TaskSpecError(path, "lists a resource twice")
    return names


def _int(t: Mapping[str, Any], path: str, lo: int, hi: int, default: Any = _MISSING) -> int:
    value = _get(t, path, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskSpecError(path, "must be an integer", expected=f"an integer in {lo}..{hi}", found=value)
    if not lo <= value <= hi:
        raise TaskSpecError(path, f"must be in {lo}..{hi}, got {value}", expected=f"{lo}..{hi}", found=value)
    return value


def _float(t: Mapping[str, Any], path: str, default: Any) -> float:
    value = _get(t, path, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TaskSpecError(path, "must be a number", expected="a number", found=value)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range, e.g. 10**400 in a JSON manifest
        raise TaskSpecError(path, "must be finite", expected="a finite number", found=value) from None
    if not math.isfinite(number):
        raise TaskSpecError(path, "must be finite", expected="a finite number", found=number)
    return number


def _positive_float(t: Mapping[str, Any], path: str, default: Any = _MISSING) -> float:
    value = _float(t, path, default)
    if value <= 0:
        raise TaskSpecError(path, f"must be > 0, got {value}", expected="> 0", found=value)
    return value


def _unit_float(t: Mapping[str, Any], path: str, default: Any = _MISSING) -> float:
    value = _float(t, path, default)
    if not 0 <= value < 1:
        raise TaskSpecError(path, f"must be in [0, 1), got {value}", expected="[0, 1)", found=value)
    return value
