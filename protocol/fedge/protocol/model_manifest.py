"""The model manifest: the JSON document that travels with every trainable ``.tflite``.

The aggregator writes it when it builds a model; the agent reads it before loading the model.
It pins the model's bytes (SHA-256), describes the flat weight vector's layout (so updates can
be encoded, checked and aggregated tensor by tensor without TensorFlow), and carries the
feature normalisation the device must apply to its inputs.

An MLP's layout follows from its task. An imported Keras model's (a task with ``[model] type =
"imported"``) cannot: its manifest carries an ``imported`` section (which layers train, which
are frozen, the Keras file's and weights' hashes) and its ``layout`` is read, strictly, rather
than derived.

Only plain data lives here; hashing a file or loading a model is the callers' job.
"""

from __future__ import annotations

import itertools
import json
import math
import re
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
#: An imported model: at most this many trainable Dense layers (as an MLP's layers), frozen
#: layers listed, and trainable parameters (64 MiB of float32, the model file's own limit).
MAX_IMPORTED_TRAINABLE_LAYERS = 16
MAX_IMPORTED_FROZEN_LAYERS = 1024
MAX_IMPORTED_PARAMETERS = 16 * 1024 * 1024
#: A Keras layer name as the manifest carries it: no "/" (it separates a layout name's parts),
#: no control characters, at most 128 characters.
_LAYER_NAME_RE = re.compile(r"[^/\x00-\x1f\x7f]{1,128}")
_FILE_NAME_RE = re.compile(r"[^/\x00-\x1f\x7f]{1,255}")
_CLASS_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VERSION_RE = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")

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
class ImportedLayer:
    """A layer of an imported Keras model: its name and its Keras class (``Dense``, ``Conv1D``)."""

    name: str
    class_name: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "class": self.class_name}


@dataclass(frozen=True)
class ImportedModel:
    """The manifest's ``imported`` section: where a model came from and what of it trains.

    ``layout`` is the trainable weights' layout (``<layer>/kernel``, ``<layer>/bias`` of each
    trainable Dense layer, in order); it is written as the manifest's top-level ``layout``, not
    twice. ``weights_sha256`` is the SHA-256 of every weight of the Keras model, frozen and
    trainable, layer by layer as Keras lists them, as little-endian float32: it names the
    imported weights whatever file they came in.
    """

    keras_file: str
    keras_sha256: str
    keras_version: str
    weights_sha256: str
    input_shape: tuple[int, ...]
    trainable_layers: tuple[ImportedLayer, ...]
    frozen_layers: tuple[ImportedLayer, ...]
    layout: tuple[TensorLayout, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "keras_file": self.keras_file,
            "keras_sha256": self.keras_sha256,
            "keras_version": self.keras_version,
            "weights_sha256": self.weights_sha256,
            "input_shape": list(self.input_shape),
            "trainable_layers": [layer.to_dict() for layer in self.trainable_layers],
            "frozen_layers": [layer.to_dict() for layer in self.frozen_layers],
        }


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
    #: Set exactly when the task's model is imported (``[model] type = "imported"``).
    imported: ImportedModel | None = None

    def __post_init__(self) -> None:
        if (self.imported is not None) != (self.task.model.type == "imported"):
            raise ManifestError(
                f"manifest: imported must be given exactly when the task's model type is 'imported' "
                f"(it is {self.task.model.type!r})",
                field="imported",
            )

    @property
    def layout(self) -> tuple[TensorLayout, ...]:
        """The flat weight vector's tensors: an MLP's from its task, an imported model's own."""
        if self.imported is not None:
            return self.imported.layout
        return mlp_tensor_layout(self.task.layer_sizes)

    @property
    def parameter_count(self) -> int:
        return sum(t.size for t in self.layout)

    def to_dict(self) -> dict[str, Any]:
        doc = {
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
        if self.imported is not None:  # absent otherwise: a built model's manifest is as it was
            doc["imported"] = self.imported.to_dict()
        return doc

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
    imported = None
    if task.model.type == "imported":
        imported = _imported_from_dict(data.get("imported"), data.get("layout"), task)
    elif "imported" in data:
        raise ManifestError(
            "manifest: imported is only for a task whose [model] type is 'imported'",
            field="imported",
            expected="no key",
            found="an imported section",
        )
    manifest = ModelManifest(
        task=task,
        model_file=model_file,
        model_sha256=data["model_sha256"],
        model_bytes=model_bytes,
        initial_weights_sha256=data["initial_weights_sha256"],
        normalisation=normalisation,
        tensorflow_version=tf_version,
        imported=imported,
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


_IMPORTED_KEYS = frozenset(
    {
        "keras_file",
        "keras_sha256",
        "keras_version",
        "weights_sha256",
        "input_shape",
        "trainable_layers",
        "frozen_layers",
    }
)
_LAYOUT_KEYS = frozenset({"name", "shape", "offset", "size"})


def _imported_from_dict(data: Any, layout_raw: Any, task: TaskSpec) -> ImportedModel:
    """The ``imported`` section and the top-level ``layout`` of an imported model's manifest,
    checked field by field: the layout is read here, not derived, so it gets every check a
    derived one gets for free (contiguous offsets, sizes, Dense layers chained to the outputs)."""
    if not isinstance(data, dict):
        raise _must_be("imported", "an object (the task's model is imported)", type(data).__name__)
    if set(data) != _IMPORTED_KEYS:
        raise _must_be(
            "imported", f"an object with exactly: {', '.join(sorted(_IMPORTED_KEYS))}", sorted(data)
        )
    keras_file = data["keras_file"]
    if (
        not isinstance(keras_file, str)
        or not _FILE_NAME_RE.fullmatch(keras_file)
        or keras_file in (".", "..")
    ):
        raise _must_be("imported.keras_file", "a plain file name of at most 255 characters", keras_file)
    for key in ("keras_sha256", "weights_sha256"):
        if not is_sha256_hex(data[key]):
            raise _must_be(f"imported.{key}", "64 lowercase hex digits", data[key])
    if not isinstance(data["keras_version"], str) or not _VERSION_RE.fullmatch(data["keras_version"]):
        raise _must_be("imported.keras_version", "a version string", data["keras_version"])
    shape = data["input_shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(_is_positive_int(n) for n in shape)
        or math.prod(shape) != task.input_dim
    ):
        raise _must_be(
            "imported.input_shape",
            f"[d] or [length, channels] of {task.input_dim} inputs in all (the task's input_dim)",
            shape,
        )
    trainable = _imported_layers(data["trainable_layers"], "trainable_layers", MAX_IMPORTED_TRAINABLE_LAYERS)
    frozen = _imported_layers(data["frozen_layers"], "frozen_layers", MAX_IMPORTED_FROZEN_LAYERS)
    return ImportedModel(
        keras_file=keras_file,
        keras_sha256=data["keras_sha256"],
        keras_version=data["keras_version"],
        weights_sha256=data["weights_sha256"],
        input_shape=tuple(shape),
        trainable_layers=trainable,
        frozen_layers=frozen,
        layout=_imported_layout(layout_raw, trainable, task.output_dim),
    )


def _imported_layers(raw: Any, key: str, limit: int) -> tuple[ImportedLayer, ...]:
    field = f"imported.{key}"
    lowest = 1 if key == "trainable_layers" else 0
    if not isinstance(raw, list) or not lowest <= len(raw) <= limit:
        raise _must_be(
            field, f"a list of {lowest} to {limit} layers", raw if not isinstance(raw, list) else len(raw)
        )
    layers: list[ImportedLayer] = []
    for i, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or set(item) != {"name", "class"}
            or not isinstance(item["name"], str)
            or not _LAYER_NAME_RE.fullmatch(item["name"])
            or not isinstance(item["class"], str)
            or not _CLASS_NAME_RE.fullmatch(item["class"])
        ):
            raise _must_be(
                f"{field}[{i}]",
                "{name, class}: a layer name of 1 to 128 characters without '/', a Keras class name",
                item,
            )
        layers.append(ImportedLayer(item["name"], item["class"]))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise _must_be(field, "layers of distinct names", names)
    return tuple(layers)


def _imported_layout(
    raw: Any, trainable: Sequence[ImportedLayer], output_dim: int
) -> tuple[TensorLayout, ...]:
    """Each trainable layer's ``<name>/kernel`` ``[n_in, n_out]`` and optional ``<name>/bias``
    ``[n_out]``, in order, each layer reading what the previous one gives, the last giving the
    task's outputs, the offsets contiguous from 0."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= 2 * len(trainable):
        found = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise _must_be(
            "layout", f"a list of 1 to {2 * len(trainable)} tensors (the trainable layers')", found
        )
    entries: list[TensorLayout] = []
    offset = 0
    for i, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or set(item) != _LAYOUT_KEYS
            or not isinstance(item["name"], str)
            or not isinstance(item["shape"], list)
            or not 1 <= len(item["shape"]) <= 2
            or not all(_is_positive_int(n) and n <= MAX_IMPORTED_PARAMETERS for n in item["shape"])
        ):
            raise _must_be(
                f"layout[{i}]", "{name, shape, offset, size} with a shape of 1 or 2 positive sizes", item
            )
        tensor = TensorLayout(item["name"], tuple(item["shape"]), offset)
        if _canonical([item["offset"], item["size"]]) != _canonical([offset, tensor.size]):
            raise _must_be(f"layout[{i}]", f"at offset {offset} with size {tensor.size} (contiguous)", item)
        offset += tensor.size
        if offset > MAX_IMPORTED_PARAMETERS:
            raise _must_be("layout", f"at most {MAX_IMPORTED_PARAMETERS} parameters in all", offset)
        entries.append(tensor)
    position = 0
    width: int | None = None
    for layer in trainable:
        kernel = entries[position] if position < len(entries) else None
        if kernel is None or kernel.name != f"{layer.name}/kernel" or len(kernel.shape) != 2:
            raise _must_be(
                f"layout[{position}]", f"'{layer.name}/kernel' [n_in, n_out]", kernel and kernel.name
            )
        if width is not None and kernel.shape[0] != width:
            raise _must_be(
                f"layout[{position}]",
                f"a kernel reading the previous layer's {width} outputs",
                list(kernel.shape),
            )
        width = kernel.shape[1]
        position += 1
        bias = entries[position] if position < len(entries) else None
        if bias is not None and bias.name == f"{layer.name}/bias":
            if bias.shape != (width,):
                raise _must_be(
                    f"layout[{position}]", f"'{layer.name}/bias' of shape [{width}]", list(bias.shape)
                )
            position += 1
    if position != len(entries):
        raise _must_be(
            f"layout[{position}]", "absent: every tensor belongs to a trainable layer", entries[position].name
        )
    if width != output_dim:
        raise _must_be("layout", f"a last layer of {output_dim} outputs (the task's output_dim)", width)
    return tuple(entries)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
