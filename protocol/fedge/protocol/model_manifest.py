"""The model manifest: the JSON document that travels with every trainable ``.tflite``.

The aggregator writes it when it builds a model; the agent reads it before loading the model.
It pins the model's bytes (SHA-256), describes the flat weight vector's layout (so updates can
be encoded, checked and aggregated tensor by tensor without TensorFlow), and carries the
feature normalisation the device must apply to its inputs.

Only plain data lives here; hashing a file or loading a model is the callers' job.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import FedgeError, FieldError, ManifestError
from fedge.protocol.task import TaskSpec, task_spec_from_dict

MANIFEST_FORMAT = "fedge-model/1"
#: The file beside the model in a ``fedge model build`` directory that holds the initial weights
#: (a weights blob, :mod:`fedge.protocol.weights`; ``initial_weights_sha256`` is its hash). Here,
#: not in the numpy-based weights module, so tools that only look at the directory stay light.
INITIAL_WEIGHTS_FILE = "initial_weights.f32"
#: Manifests are small; anything larger is refused before ``json.loads`` allocates it.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

#: Signature names and their input/output names, identical in every fedge model.
SIGNATURES: dict[str, dict[str, list[str]]] = {
    "train": {"inputs": ["x", "y"], "outputs": ["loss"]},
    "infer": {"inputs": ["x"], "outputs": ["outputs"]},
    "evaluate": {"inputs": ["x", "y"], "outputs": ["loss", "metric"]},
    "get_weights": {"inputs": [], "outputs": ["weights"]},
    "set_weights": {"inputs": ["weights"], "outputs": ["parameter_count"]},
}


@dataclass(frozen=True)
class TensorLayout:
    """One tensor's place in the flat float32 weight vector: ``flat[offset:offset+size]``."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def mlp_tensor_layout(layer_sizes: Sequence[int]) -> tuple[TensorLayout, ...]:
    """Layout of an MLP's weights: ``dense{i}/kernel`` then ``dense{i}/bias``, layer by layer.

    Two sizes (a task with ``hidden = []``) give one layer, ``dense0``: a linear model."""
    layout: list[TensorLayout] = []
    offset = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(layer_sizes)):
        for name, shape in ((f"dense{i}/kernel", (n_in, n_out)), (f"dense{i}/bias", (n_out,))):
            layout.append(TensorLayout(name, shape, offset))
            offset += math.prod(shape)
    return tuple(layout)


@dataclass(frozen=True)
class Normalisation:
    """Per-feature standardisation ``(x - mean) / std`` the device applies before the model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ManifestError("normalisation: mean and std differ in length")
        for i, (m, s) in enumerate(zip(self.mean, self.std, strict=True)):
            if not (math.isfinite(m) and math.isfinite(s)) or s <= 0:
                raise ManifestError(
                    f"normalisation[{i}]: mean must be finite and std finite and > 0, got mean={m}, std={s}",
                    field=f"normalisation[{i}]",
                    expected="finite mean, finite std > 0",
                    found=(m, s),
                )

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_dict(data: Any) -> Normalisation:
        if not isinstance(data, Mapping) or set(data) != {"mean", "std"}:
            raise ManifestError(
                "normalisation: must be an object with 'mean' and 'std'",
                field="normalisation",
                expected="an object with 'mean' and 'std'",
            )
        mean, std = data["mean"], data["std"]
        for key, values in (("mean", mean), ("std", std)):
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ManifestError(
                    f"normalisation.{key}: must be a list of numbers",
                    field=f"normalisation.{key}",
                    expected="a list of numbers",
                )
        try:
            return Normalisation(tuple(float(v) for v in mean), tuple(float(v) for v in std))
        except OverflowError:  # an integer beyond float range
            raise ManifestError("normalisation: values must be finite") from None


@dataclass(frozen=True)
class ModelManifest:
    """Everything a device needs to know about a model besides its bytes."""

    task: TaskSpec
    model_file: str
    model_sha256: str
    model_bytes: int
    initial_weights_sha256: str
    normalisation: Normalisation | None
    tensorflow_version: str

    @property
    def layout(self) -> tuple[TensorLayout, ...]:
        return mlp_tensor_layout(self.task.layer_sizes)

    @property
    def parameter_count(self) -> int:
        return sum(t.size for t in self.layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "task": self.task.to_dict(),
            "task_sha256": self.task.sha256(),
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "model_bytes": self.model_bytes,
            "initial_weights_sha256": self.initial_weights_sha256,
            "parameter_count": self.parameter_count,
            "layout": [
                {"name": t.name, "shape": list(t.shape), "offset": t.offset, "size": t.size}
                for t in self.layout
            ],
            "input_dim": self.task.input_dim,
            "output_dim": self.task.output_dim,
            "feature_names": list(self.task.features.names),
            "signatures": SIGNATURES,
            "normalisation": self.normalisation.to_dict() if self.normalisation else None,
            "builder": {"tensorflow": self.tensorflow_version},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def manifest_from_json(raw: bytes | str) -> ModelManifest:
    """Parse and cross-check a manifest; every inconsistency is a :class:`ManifestError`."""
    # Checked on the cheap length first, then on the UTF-8 size of a str (a character may be
    # up to 4 bytes), before json.loads allocates anything.
    size = len(raw)
    if size <= MAX_MANIFEST_BYTES and isinstance(raw, str):
        size = len(raw.encode("utf-8", errors="surrogatepass"))
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest is over the limit of {MAX_MANIFEST_BYTES} bytes",
            field="manifest",
            expected=f"<= {MAX_MANIFEST_BYTES} bytes",
            found=size,
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; so is an integer over
        # Python's digit limit. Deep nesting exhausts the decoder's recursion.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ManifestError(f"manifest is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a JSON object")
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"manifest format must be {MANIFEST_FORMAT!r}, got {data.get('format')!r}",
            field="format",
            expected=MANIFEST_FORMAT,
            found=data.get("format"),
        )
    try:
        task = task_spec_from_dict(data["task"])
    except KeyError:
        raise ManifestError("manifest: missing 'task'") from None
    except FieldError as exc:
        raise ManifestError(
            f"manifest: {exc}",
            field="task" if exc.field is None or exc.field.startswith("<") else f"task.{exc.field}",
            expected=exc.expected,
            found=exc.found,
        ) from None
    except FedgeError as exc:
        raise ManifestError(f"manifest: {exc}", field="task") from None
    for key in ("model_sha256", "initial_weights_sha256"):
        if not is_sha256_hex(data.get(key)):
            raise _must_be(key, "64 lowercase hex digits", data.get(key))
    model_file = data.get("model_file")
    if not isinstance(model_file, str) or "/" in model_file or model_file in ("", ".", ".."):
        raise _must_be("model_file", "a plain file name", model_file)
    model_bytes = data.get("model_bytes")
    if isinstance(model_bytes, bool) or not isinstance(model_bytes, int) or model_bytes <= 0:
        raise _must_be("model_bytes", "a positive integer", model_bytes)
    norm_raw = data.get("normalisation")
    normalisation = None if norm_raw is None else Normalisation.from_dict(norm_raw)
    if normalisation is not None and len(normalisation.mean) != task.input_dim:
        raise ManifestError(
            f"manifest: normalisation has {len(normalisation.mean)} features, the task has {task.input_dim}",
            field="normalisation",
            expected=task.input_dim,
            found=len(normalisation.mean),
        )
    builder = data.get("builder")
    tf_version = builder.get("tensorflow") if isinstance(builder, dict) else None
    if not isinstance(tf_version, str):
        raise _must_be("builder.tensorflow", "a string", tf_version)
    manifest = ModelManifest(
        task=task,
        model_file=model_file,
        model_sha256=data["model_sha256"],
        model_bytes=model_bytes,
        initial_weights_sha256=data["initial_weights_sha256"],
        normalisation=normalisation,
        tensorflow_version=tf_version,
    )
    # Derived fields must agree with the task: a manifest edited by hand is caught here.
    # Compared as canonical JSON, so 5447.0 or "5447" does not pass for 5447.
    if _canonical(data.get("task_sha256")) != _canonical(task.sha256()):
        raise ManifestError(
            "manifest: task_sha256 does not match the embedded task",
            field="task_sha256",
            expected=task.sha256(),
            found=data.get("task_sha256"),
        )
    expected = manifest.to_dict()
    for key in _DERIVED_FIELDS:
        if _canonical(data.get(key)) != _canonical(expected[key]):
            raise ManifestError(
                f"manifest: {key} {_canonical(data.get(key))[:80]} does not match the task's "
                f"{_canonical(expected[key])[:80]}",
                field=key,
                expected=expected[key],
                found=data.get(key),
            )
    return manifest


def _must_be(field: str, expected: str, found: Any) -> ManifestError:
    """A field that is not what the contract allows: the message and the ``expected`` attribute
    are written from the one phrase, so what a reader is told and what a caller sees agree."""
    return ManifestError(f"manifest: {field} must be {expected}", field=field, expected=expected, found=found)


_DERIVED_FIELDS = ("parameter_count", "layout", "input_dim", "output_dim", "feature_names", "signatures")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def normalisation_from_moments(
    count: int, total: Sequence[float], total_sq: Sequence[float], min_std: float = 1e-6
) -> Normalisation:
    """Mean and standard deviation from a count, a sum and a sum of squares per feature.

    Moments add up across devices, so the same function serves centralised data and the
    federated computation (each device sends only its count and sums, never its samples).
    ``min_std`` keeps constant features from dividing by zero.
    """
    if count < 2:
        raise ManifestError(f"normalisation needs at least 2 samples, got {count}")
    if len(total) != len(total_sq):
        raise ManifestError("normalisation: sums and sums of squares differ in length")
    mean = [s / count for s in total]
    std = [
        max(math.sqrt(max(sq / count - m * m, 0.0)), min_std) for m, sq in zip(mean, total_sq, strict=True)
    ]
    return Normalisation(tuple(mean), tuple(std))
