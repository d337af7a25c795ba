"""``fedge task init``: a commented task spec for a building's own sensors, from their EdgeX profile.

The profile says which resources a device has and of which type; the one resource named as the
label decides the task:

- a ``Bool`` label is a classification with the two classes ``false`` and ``true``;
- a ``String`` label is a classification whose classes are the values the profile's device
  commands map readings to (``resourceOperations[].mappings``, EdgeX's only way to give a
  resource a fixed set of values); without mappings, ``--classes`` must name them;
- an integer label is a regression, or with ``--classes`` a classification whose readings are
  class indices (0 is the first class);
- a float label is a regression.

The features are every other readable numeric (or Bool) resource of the profile, or those
``--features`` names. There is no ``[features.window]``: building sensors report every few
seconds to minutes, so one aligned reading row (one EdgeX event of a command that reads them
all) is one sample and its features are the readings themselves. The written file says so, with
a commented-out window to start from when a task needs one.

The text is checked before it is written: it parses with :func:`parse_task_spec` and passes
:func:`check_task_against_profile`, as the agent will check it at start. Every refusal is one
line naming the option to change.

This module's top level imports only the standard library and ``fedge.protocol``, so building
``fedge``'s parser stays cheap; the profile parser (PyYAML) is imported by the command.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.protocol.errors import FedgeError
from fedge.protocol.task import (
    MAX_HIDDEN_UNITS,
    MAX_LAYERS,
    MAX_WINDOW,
    RAW_WINDOW,
    WINDOW_STATISTICS,
    TaskSpec,
    parse_task_spec,
)
from fedge.tools.standalone import run_alone

if TYPE_CHECKING:
    from fedge.agent.edgex.profile import DeviceProfile, DeviceResource

EXIT_USAGE = 2
#: Hidden layers when ``--hidden`` is not given: one small layer, enough for a handful of
#: building sensors and a few hundred weights to send per round.
DEFAULT_HIDDEN: tuple[int, ...] = (16,)
#: Statistics of a window when ``--window`` is given without ``--statistics``.
DEFAULT_STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max")
#: ``--hidden`` spellings of a linear model (``hidden = []``).
LINEAR_SPELLINGS = ("", "none", "linear")
#: A task name and each resource name of a spec (``fedge.protocol.task``'s rule).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_INTEGER_TYPES = ("Int8", "Int16", "Int32", "Int64", "Uint8", "Uint16", "Uint32", "Uint64")
_FLOAT_TYPES = ("Float32", "Float64")

# Training defaults: starting points for a few sensors and one sample a minute (the same
# optimizer as tasks/har-watch.toml; two local epochs because samples accrue slowly).
_TRAINING = {
    "optimizer": "sgd",
    "learning_rate": 0.02,
    "momentum": 0.9,
    "batch_size": 32,
    "local_epochs": 2,
}


class TaskInitError(FedgeError):
    """The options cannot make a valid task from this profile; the message names the option."""


@dataclass(frozen=True)
class TaskChoice:
    """What ``fedge task init`` decided, before it is written out as TOML."""

    name: str
    profile: DeviceProfile
    features: tuple[DeviceResource, ...]
    label: DeviceResource
    classes: tuple[str, ...] | None
    #: Where the classes came from: "bool", "mappings" (with the command names), "option".
    classes_source: str
    hidden: tuple[int, ...]
    #: Whether ``--features`` named the features (else: every other readable numeric resource).
    features_chosen: bool = False
    #: ``--window``: (rows per window, rows between window starts), or None for one row a sample.
    window: tuple[int, int] | None = None
    #: ``--statistics``: what each window computes per resource (with ``window`` only).
    statistics: tuple[str, ...] = DEFAULT_STATISTICS

    @property
    def kind(self) -> str:
        return "regression" if self.classes is None else "classification"


# --- choosing -----------------------------------------------------------------------------------


def choose_task(
    profile: DeviceProfile,
    label: str,
    features: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    name: str | None = None,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    window: tuple[int, int] | None = None,
    statistics: Sequence[str] | None = None,
) -> TaskChoice:
    """Picks the label, its classes and the features from ``profile`` (see the module docstring)."""
    from fedge.agent.edgex.readings import NUMERIC_TYPES  # noqa: PLC0415 - with the profile parser
    from fedge.agent.edgex.samples import bool_class_indices  # noqa: PLC0415

    label_resource = _resource(profile, "--label", label)
    _check_task_name("--label", label_resource.name)
    if features is None:
        chosen = tuple(
            r for r in profile.resources if r.name != label_resource.name and r.readable and r.numeric
        )
        if not chosen:
            raise TaskInitError(
                f"profile {profile.name!r} has no readable numeric resource besides the label "
                f"{label_resource.name!r} to use as a feature"
            )
    else:
        if not features:
            raise TaskInitError("--features names no resource")
        picked: list[DeviceResource] = []
        for feature in features:
            if not feature:
                raise TaskInitError("--features lists an empty name")
            if feature == label_resource.name:
                raise TaskInitError(f"--features: {feature!r} is the label; a resource cannot be both")
            if any(r.name == feature for r in picked):
                raise TaskInitError(f"--features lists {feature!r} twice")
            resource = _resource(profile, "--features", feature)
            if not resource.numeric:
                raise TaskInitError(
                    f"--features: resource {feature!r} is {resource.value_type}, not a number; "
                    f"features need one of {', '.join(NUMERIC_TYPES)}"
                )
            picked.append(resource)
        chosen = tuple(picked)
    for resource in chosen:
        _check_task_name("--features", resource.name)

    value_type = label_resource.value_type
    option_classes = _check_classes(classes) if classes is not None else None
    task_classes: tuple[str, ...] | None
    if value_type == "Bool":
        task_classes = option_classes or ("false", "true")
        source = "option" if option_classes else "bool"
        if len(task_classes) != 2 or bool_class_indices(task_classes) is None:
            raise TaskInitError(
                f"--classes: {label_resource.name!r} is a Bool, so it has 2 classes that name both "
                "values ('false' and 'true', or '0' and '1', any case and order) or neither (then "
                f"the first class is false, the second true); got {list(task_classes)}"
            )
    elif value_type == "String":
        mapped, commands = _mapped_values(profile, label_resource.name)
        if option_classes is not None:
            task_classes, source = option_classes, "option"
        elif len(mapped) >= 2:
            task_classes, source = mapped, "mappings:" + ",".join(commands)
        else:
            raise TaskInitError(
                f"--label: resource {label_resource.name!r} is a String with no known set of values "
                f"in profile {profile.name!r} (no resourceOperations mappings); name its classes "
                "with --classes a,b,c"
            )
    elif value_type in _INTEGER_TYPES:
        task_classes = option_classes
        source = "option" if option_classes else ""
    elif value_type in _FLOAT_TYPES:
        if option_classes is not None:
            raise TaskInitError(
                f"--classes: resource {label_resource.name!r} is {value_type}, a number: its task is a "
                "regression, which takes no classes"
            )
        task_classes, source = None, ""
    else:
        raise TaskInitError(
            f"--label: resource {label_resource.name!r} is {value_type}; a label must be Bool, "
            "String, an integer or a float"
        )

    if statistics is not None and window is None:
        raise TaskInitError("--statistics needs --window SIZE[,STEP]: statistics are computed over a window")
    task_name = name if name is not None else default_name(profile.name, label_resource.name)
    if not _NAME_RE.fullmatch(task_name):
        raise TaskInitError(
            f"--name: {task_name!r} is not a valid task name (letters, digits, _ . -, up to 128, "
            "starting with a letter or digit)"
        )
    return TaskChoice(
        task_name,
        profile,
        chosen,
        label_resource,
        task_classes,
        source,
        tuple(hidden),
        features_chosen=features is not None,
        window=window,
        statistics=tuple(statistics) if statistics is not None else DEFAULT_STATISTICS,
    )


def default_name(profile_name: str, label: str) -> str:
    """``<profile>-<label>`` in lower case, with every character a task name may not hold as ``-``."""
    slug = re.sub(r"[^a-z0-9_.\-]+", "-", f"{profile_name}-{label}".lower()).strip("-_.")
    return slug[:128].rstrip("-_.") or "task"


def parse_hidden(text: str) -> tuple[int, ...]:
    """``--hidden``: comma-separated layer sizes (``32,16``), or ``none`` for a linear model."""
    if text.strip().lower() in LINEAR_SPELLINGS:
        return ()
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isascii() or not part.isdigit() or not 1 <= int(part) <= MAX_HIDDEN_UNITS:
            raise TaskInitError(
                f"--hidden: {part!r} is not a layer size; give sizes in 1..{MAX_HIDDEN_UNITS} "
                "separated by commas, e.g. 32,16, or 'none' for a linear model"
            )
        sizes.append(int(part))
    if len(sizes) > MAX_LAYERS:
        raise TaskInitError(f"--hidden: {len(sizes)} layers; at most {MAX_LAYERS}")
    return tuple(sizes)


def parse_window(text: str) -> tuple[int, int]:
    """``--window``: ``SIZE`` (windows side by side: step = size) or ``SIZE,STEP``."""
    parts = [part.strip() for part in text.split(",")]
    if not 1 <= len(parts) <= 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise TaskInitError(
            f"--window: {text!r} is not SIZE or SIZE,STEP (rows per window, rows between window "
            "starts), e.g. 6 or 6,1"
        )
    size = int(parts[0])
    step = int(parts[1]) if len(parts) == 2 else size
    if not 1 <= size <= MAX_WINDOW or not 1 <= step <= MAX_WINDOW:
        raise TaskInitError(f"--window: size and step must be in 1..{MAX_WINDOW}, got {size},{step}")
    return size, step


def parse_statistics(text: str) -> tuple[str, ...]:
    """``--statistics``: comma-separated names of :data:`WINDOW_STATISTICS`, each once, or
    ``raw`` alone (the window's readings themselves, for a model that reads the signal)."""
    names = split_names(text)
    for name in names:
        if name not in WINDOW_STATISTICS and name != RAW_WINDOW:
            raise TaskInitError(
                f"--statistics: unknown statistic {name!r}; known: {', '.join(WINDOW_STATISTICS)}; "
                f"or {RAW_WINDOW} alone (the readings themselves)"
            )
        if names.count(name) > 1:
            raise TaskInitError(f"--statistics lists {name!r} twice")
    if RAW_WINDOW in names and len(names) > 1:
        raise TaskInitError(
            f"--statistics: {RAW_WINDOW} (the readings themselves) stands alone, not with statistics"
        )
    return tuple(names)


def split_names(text: str) -> list[str]:
    """A comma-separated option value, each name stripped of surrounding spaces."""
    return [part.strip() for part in text.split(",")]


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if any(not c for c in classes):
        raise TaskInitError("--classes lists an empty name")
    if len(classes) < 2:
        raise TaskInitError("--classes needs at least 2 classes")
    for c in classes:
        if classes.count(c) > 1:
            raise TaskInitError(f"--classes lists {c!r} twice")
    return tuple(classes)


def _resource(profile: DeviceProfile, option: str, name: str) -> DeviceResource:
    resource = profile.resource(name)
    if resource is None:
        close = difflib.get_close_matches(name, list(profile.resource_names), n=1, cutoff=0.6)
        hint = (
            f" (did you mean {close[0]!r}?)"
            if close
            else f"; its resources: {', '.join(profile.resource_names)}"
        )
        raise TaskInitError(f"{option}: profile {profile.name!r} has no resource {name!r}{hint}")
    if not resource.readable:
        raise TaskInitError(
            f"{option}: resource {name!r} cannot be read (readWrite is {resource.read_write!r})"
        )
    return resource


def _check_task_name(option: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise TaskInitError(
            f"{option}: resource {name!r} cannot be named in a task spec (letters, digits, _ . -, up to 128)"
        )


def _mapped_values(profile: DeviceProfile, resource: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The distinct values readable commands map ``resource``'s readings to, and those commands."""
    values: list[str] = []
    commands: list[str] = []
    for command in profile.commands:
        if not command.readable:
            continue
        for op in command.resource_operations:
            if op.device_resource != resource or not op.mappings:
                continue
            commands.append(command.name)
            for value in op.mappings.values():
                if value and value not in values:
                    values.append(value)
    return tuple(values), tuple(dict.fromkeys(commands))


# --- writing ------------------------------------------------------------------------------------


def render_task(choice: TaskChoice, profile_path: str = "") -> str:
    """The commented TOML text of ``choice`` (see ``docs/task-spec.md`` for every field)."""
    p = choice.profile
    label = choice.label
    names = [r.name for r in choice.features]
    lines: list[str] = [
        "# Task spec written by `fedge task init` from the EdgeX device profile",
        f"# {_comment(p.name)!r}" + (f" ({_comment(profile_path)})." if profile_path else "."),
        "# Every field is described in docs/task-spec.md. Check the choices below, then build",
        "# the model:  fedge model build --task THIS_FILE --out MODEL_DIR",
        "",
        "[task]",
        f"name = {_toml_str(choice.name)}",
        f"description = {_toml_str(_description(choice))}",
        "",
        "[features]",
        "# EdgeX resource names of the profile, in feature order: "
        + ("those --features named." if choice.features_chosen else "every readable numeric"),
        *([] if choice.features_chosen else ["# (or Bool) resource besides the label."]),
        "# A Bool feature counts as 0 (false) or 1 (true).",
    ]
    for r in choice.features:
        lines.append(f"#   {_describe(r)}")
    lines.append(f"resources = [{', '.join(_toml_str(n) for n in names)}]")
    covering = [c.name for c in p.commands if c.readable and {*names, label.name} <= set(c.resources)]
    if choice.window is None:
        lines += [
            "# No [features.window]: one aligned reading row is one sample, and its features are the",
            "# readings themselves. Building sensors report every few seconds to minutes, so a single",
            "# row already describes the room or the machine; windows suit fast signals.",
        ]
    if covering:
        lines += [
            f"# The profile's command {covering[0]!r} reads these resources and the label in one event,",
            "# whose readings share one origin, so they align into one row as they are. Were they",
            "# read in separate events, set the reporting rate: a row then takes the readings within",
            "# a quarter of its period.",
        ]
    else:
        lines += [
            "# No command of the profile reads these resources and the label together. Readings of",
            "# separate events have different origins and align into a row only within a quarter",
            "# of the sample period: set the reporting rate, e.g. for once a minute:",
        ]
    lines.append("# sample_rate_hz = 0.016666666666666666   # once a minute")
    if choice.window is None:
        lines += [
            "# To compute statistics over several rows instead (see docs/task-spec.md):",
            "# [features.window]",
            "# size = 10          # rows per window",
            "# step = 10          # a new window every 10 rows",
            '# statistics = ["mean", "std", "min", "max"]',
        ]
    else:
        size, step = choice.window
        stats = ", ".join(_toml_str(name) for name in choice.statistics)
        if choice.statistics == (RAW_WINDOW,):
            what = [
                f"# One sample per {size} consecutive rows; its features are the window's readings",
                f"# themselves ({len(names)} resources x {size} readings = {len(names) * size} inputs),",
                '# resource by resource, oldest first (docs/task-spec.md, "Raw windows").',
            ]
        else:
            what = [
                f"# One sample per {size} consecutive rows; its features are these statistics of each",
                f"# resource over the window ({len(names)} x {len(choice.statistics)} = "
                f"{len(names) * len(choice.statistics)} inputs), resource by resource.",
            ]
        lines += [
            "",
            "[features.window]",
            *what,
            "# A classification sample takes the window's majority class, a regression its mean label.",
            f"size = {size}",
            f"step = {step}" + ("   # overlapping windows: a new one every row" if step == 1 else ""),
            f"statistics = [{stats}]",
        ]
    lines += ["", "[label]"]
    lines += [f"# {line}" for line in _label_comment(choice)]
    lines.append(f"resource = {_toml_str(label.name)}")
    if choice.classes is not None:
        lines.append(f"classes = [{', '.join(_toml_str(c) for c in choice.classes)}]")
    hidden = ", ".join(str(h) for h in choice.hidden)
    hidden_note = (
        "# a linear model (no hidden layer)"
        if not choice.hidden
        else "# hidden layer sizes, ReLU; [] is a linear model"
    )
    output = (
        f"softmax over {len(choice.classes)} classes, cross-entropy loss"
        if choice.classes is not None
        else "one numeric output, squared-error loss"
    )
    per_resource = 1
    if choice.window is not None:
        per_resource = choice.window[0] if choice.statistics == (RAW_WINDOW,) else len(choice.statistics)
    n_inputs = len(names) * per_resource
    lines += [
        "",
        "[model]",
        (
            f"# A small multi-layer perceptron: {n_inputs} inputs, {output}."
            if choice.hidden
            else f"# A linear model: {n_inputs} inputs, {output}."
        ),
        'type = "mlp"',
        f'kind = "{choice.kind}"',
        f"hidden = [{hidden}]   {hidden_note}",
        "seed = 0   # initial weights (Glorot uniform, zero biases)",
        "",
        "[training]",
        "# Local training on each device in every round; starting points for a few sensors and a",
        "# sample a minute (two epochs per round, since samples accrue slowly).",
        f'optimizer = "{_TRAINING["optimizer"]}"',
        f"learning_rate = {_TRAINING['learning_rate']}",
        f"momentum = {_TRAINING['momentum']}",
        f"batch_size = {_TRAINING['batch_size']}",
        f"local_epochs = {_TRAINING['local_epochs']}",
        "",
    ]
    return "\n".join(lines)


def _label_comment(choice: TaskChoice) -> list[str]:
    from fedge.agent.edgex.samples import bool_class_indices  # noqa: PLC0415

    label = choice.label
    what = _describe(label)
    if choice.classes is None:
        return [
            f"{what}.",
            "A number, so the task is a regression (one output, the predicted value); no classes.",
        ]
    source = choice.classes_source
    if label.value_type == "Bool":
        indices = bool_class_indices(choice.classes)
        assert indices is not None  # choose_task checked them
        false_index, true_index = indices
        return [
            f"{what}.",
            f"A Bool, so two classes: false is {choice.classes[false_index]!r}, "
            f"true is {choice.classes[true_index]!r}" + (" (from --classes)." if source == "option" else "."),
        ]
    if label.value_type == "String":
        if source.startswith("mappings:"):
            commands = source.removeprefix("mappings:").split(",")
            return [
                f"{what}.",
                "Its classes are the values the profile's command"
                + ("s " if len(commands) > 1 else " ")
                + ", ".join(repr(c) for c in commands)
                + " map readings to (resourceOperations mappings).",
                "A reading with another value is no class: its row is dropped (unknown_label).",
            ]
        return [
            f"{what}.",
            "Classes from --classes: a reading is the class it names; another value drops its row",
            "(unknown_label).",
        ]
    return [
        f"{what}.",
        "An integer label with --classes: a reading is a class index, 0 is the first class;",
        "another value drops its row (unknown_label).",
    ]


def _description(choice: TaskChoice) -> str:
    verb = "Predict" if choice.classes is None else "Classify"
    features = ", ".join(r.name for r in choice.features)
    return f"{verb} {choice.label.name} from {features} (EdgeX profile {choice.profile.name})."


def _describe(resource: DeviceResource) -> str:
    parts = [f"{resource.name}: {resource.value_type}"]
    if resource.units:
        parts.append(resource.units)
    if resource.minimum is not None or resource.maximum is not None:
        lo = "" if resource.minimum is None else f"{resource.minimum:g}"
        hi = "" if resource.maximum is None else f"{resource.maximum:g}"
        parts.append(f"{lo}..{hi}")
    text = ", ".join(parts)
    if resource.description:
        text += f" ({resource.description})"
    return _comment(text)


def _comment(text: str) -> str:
    """Text fit for one comment line: no control characters, runs of white space as one space."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL must be escaped in TOML too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_task(choice: TaskChoice, out: Path, profile_path: str = "", force: bool = False) -> TaskSpec:
    """Renders, checks (spec and profile) and writes the task; returns the parsed spec."""
    from fedge.agent.edgex.profile import check_task_against_profile  # noqa: PLC0415
    from fedge.shell.files import atomic_write  # noqa: PLC0415

    text = render_task(choice, profile_path)
    task = parse_task_spec(text)  # a failure here is a bug in render_task: let it say so
    check_task_against_profile(task, choice.profile)
    if out.exists() and not force:
        raise TaskInitError(f"--out: {out} exists; --force replaces it")
    try:
        atomic_write(out, text.encode("utf-8"), 0o644)
    except OSError as exc:
        raise TaskInitError(f"cannot write {out}: {exc.strerror or exc}") from None
    return task


# --- command line -------------------------------------------------------------------------------


def cmd_task_init(args: argparse.Namespace) -> int:
    from fedge.agent.edgex.profile import load_profile  # noqa: PLC0415 - PyYAML

    hidden = parse_hidden(args.hidden) if args.hidden is not None else DEFAULT_HIDDEN
    profile = load_profile(args.profile)
    choice = choose_task(
        profile,
        args.label,
        features=split_names(args.features) if args.features is not None else None,
        classes=split_names(args.classes) if args.classes is not None else None,
        name=args.name,
        hidden=hidden,
        window=parse_window(args.window) if args.window is not None else None,
        statistics=parse_statistics(args.statistics) if args.statistics is not None else None,
    )
    task = write_task(choice, args.out, str(args.profile), force=args.force)
    what = (
        f"classification of {task.label.resource!r} into {len(task.label.classes)} classes"
        if task.label.classes is not None
        else f"regression of {task.label.resource!r}"
    )
    print(
        f"wrote {args.out}: task {task.name!r}, {what} from {len(task.features.resources)} features "
        f"of profile {profile.name!r}, layers {'-'.join(map(str, task.layer_sizes))}\n"
        f"next: fedge model build --task {args.out} --out MODEL_DIR"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Adds ``fedge task init`` (in a new ``task`` group) to the subparsers of ``fedge``."""
    task = subparsers.add_parser("task", help="task specs: write one from an EdgeX device profile")
    task_sub = task.add_subparsers(dest="task_command", metavar="SUBCOMMAND", required=True)
    init = task_sub.add_parser(
        "init",
        help="write a commented task spec for a profile's resources (label, features, model)",
        description="Write a valid, commented task spec from an EdgeX device profile. The label "
        "resource decides the task: Bool or String -> classification, a number -> regression.",
    )
    init.add_argument(
        "--profile", type=Path, required=True, metavar="FILE", help="EdgeX device profile (YAML)"
    )
    init.add_argument("--label", required=True, metavar="RESOURCE", help="the resource to predict")
    init.add_argument(
        "--features",
        metavar="R1,R2,...",
        help="input resources (default: every other readable numeric or Bool resource)",
    )
    init.add_argument(
        "--classes",
        metavar="A,B,...",
        help="class names: required for a String label without mappings; makes an integer label "
        "a class index",
    )
    init.add_argument("--name", help="task name (default: <profile>-<label>, lower case)")
    init.add_argument(
        "--hidden",
        metavar="N,N,...",
        help="hidden layer sizes (default 16; 'none' for a linear model)",
    )
    init.add_argument(
        "--window",
        metavar="SIZE[,STEP]",
        help="one sample per SIZE consecutive rows, a new one every STEP rows (default: STEP = SIZE); "
        "default: no window, one row is one sample",
    )
    init.add_argument(
        "--statistics",
        metavar="S1,S2,...",
        help=f"per-window statistics (with --window; default {','.join(DEFAULT_STATISTICS)}; "
        f"known: {','.join(WINDOW_STATISTICS)}; or {RAW_WINDOW} alone: the readings themselves)",
    )
    init.add_argument("--out", type=Path, required=True, metavar="FILE", help="task spec to write (TOML)")
    init.add_argument("--force", action="store_true", help="replace an existing --out file")
    init.set_defaults(func=cmd_task_init)


def main(argv: Sequence[str] | None = None) -> int:
    """This command on its own (``python -m fedge.tools.task_init task init ...``), with
    ``fedge``'s error handling: a one-line ``fedge: error: ...`` and exit code 2."""
    return run_alone(add_parser, "fedge task specs", argv)


if __name__ == "__main__":
    sys.exit(main())
