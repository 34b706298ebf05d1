"""The options of every stage: one frozen dataclass per stage owns its defaults, help and checks.

    ProfileOptions(split="retain", batch_size=8)      # library use: validated on construction
    fill(ProfileOptions, {"split": "retain"}, project) # the CLI: flags, KVW_* variables, kvw.toml

Each field is declared once with ``option(default, help, key=...)``: the default, the help text
(which the CLI shows with ``[default: …]`` appended) and the ``kvw.toml`` key that may set it.
A value is taken by one precedence rule:

    command-line flag  >  environment variable KVW_<KEY>  >  kvw.toml <key>  >  the default

so ``KVW_GAMMA=0.05 kvwctl apply`` overrides ``gamma = 0.02`` in kvw.toml and ``--gamma 0.1``
overrides both. Fields without a key (``force``, ``save_batches``, ``require``) come from flags
only. A switch with a key (``redact``) reads ``true``/``false`` (or ``1``/``0``) from its
``KVW_*`` variable. Every value is checked where it enters: a bad flag or ``KVW_*`` value is a usage error
(exit 2) naming the flag or variable; a bad kvw.toml value is a bad input file (exit 1) naming
the file and key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from kvwctl.conversation import POSITION_MODES
from kvwctl.errors import KvwError, UsageError

if TYPE_CHECKING:
    from kvwctl.config import ProjectConfig

SPLITS = ("retain", "forget")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
ENVIRONMENT_PREFIX = "KVW_"

Options = TypeVar("Options")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    key: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    shown_default: str | None = None,
) -> Any:
    """A field with its default, help text, kvw.toml key and checks in one place.

    ``choices`` and ``minimum`` are the common checks; ``check`` returns the problem with a value
    (or None) for anything else. ``shown_default`` replaces the default in the help text.
    """
    metadata = {
        "help": help,
        "key": key,
        "choices": choices,
        "minimum": minimum,
        "check": check,
        "shown_default": shown_default,
    }
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _gamma_problem(value: float) -> str | None:
    from kvwctl.method import gamma_problem

    return gamma_problem(value)


def _device_problem(value: str) -> str | None:
    return None if _DEVICE.match(value) else f"must be {DEVICE_CHOICES}, got {value!r}"


def _layers_problem(value: str) -> str | None:
    from kvwctl.method import layer_selection_problem

    return layer_selection_problem(value)


def _problem(kind: Any, value: Any, metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` for a field of type ``kind``, or None."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        return None if type(None) in allowed else "is required"
    if tuple in [typing.get_origin(item) or item for item in allowed]:
        if not isinstance(value, tuple) or not all(isinstance(item, str) for item in value):
            return f"must be a list of strings, got {value!r}"
        return None
    if bool in allowed:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if float in allowed:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
    elif int in allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
    elif str in allowed and not isinstance(value, str):
        return f"must be a string, got {value!r}"
    minimum = metadata.get("minimum")
    if minimum is not None and value < minimum:
        bound = int(minimum) if float(minimum).is_integer() else minimum
        return f"must be at least {bound}, got {value!r}"
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}, got {value!r}"
    check = metadata.get("check")
    return check(value) if check is not None else None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def environment_name(key: str) -> str:
    return ENVIRONMENT_PREFIX + key.upper()


def _validate(options: Any) -> None:
    """Check every field of a constructed options object (library use: named by flag)."""
    kinds = _field_types(type(options))
    for item in dataclasses.fields(options):
        problem = _problem(kinds[item.name], getattr(options, item.name), item.metadata)
        if problem is not None:
            raise UsageError(f"{flag_name(item.name)} {problem}")


def _device_option() -> Any:
    return option("auto", f"Device: {DEVICE_CHOICES}", key="device", check=_device_problem)


def _device_map_problem(value: str) -> str | None:
    from kvwctl.placement import device_map_problem

    return device_map_problem(value)


def _max_memory_problem(value: str) -> str | None:
    from kvwctl.placement import max_memory_problem

    return max_memory_problem(value)


def _device_map_option() -> Any:
    return option(
        None,
        "Spread the model over devices with accelerate: auto, balanced, balanced_low_0, sequential or a "
        "JSON file mapping module names to devices (0, cuda:1, cpu, disk)",
        key="device_map",
        check=_device_map_problem,
        shown_default="one device, --device",
    )


def _max_memory_option() -> Any:
    return option(
        None,
        "Memory per device for --device-map, as accelerate's max_memory: 0=20GiB,1=20GiB,cpu=60GiB",
        key="max_memory",
        check=_max_memory_problem,
        shown_default="what accelerate finds free",
    )


def _offload_folder_option() -> Any:
    return option(
        None,
        "Folder for the weights --device-map puts on disk",
        key="offload_folder",
        shown_default="a temporary folder, removed afterwards",
    )


def _vision_cache_option() -> Any:
    return option(
        None,
        "Folder of cached projected image features (never computed twice), or off",
        key="vision_cache",
        shown_default="<workdir>/vision-cache with a kvw.toml, else off",
    )


def _check_placement(options: Any) -> None:
    """``--device-map`` replaces ``--device``; ``--max-memory`` and ``--offload-folder`` need it."""
    if options.device_map is None:
        for name in ("max_memory", "offload_folder"):
            if getattr(options, name) is not None:
                raise UsageError(f"{flag_name(name)} applies with --device-map only")
    elif options.device != "auto":
        raise UsageError("--device and --device-map are exclusive: the device map places the model")


def _redact_option() -> Any:
    return option(
        False,
        "Replace sample ids and data paths in the outputs by keyed hashes and leave out the texts "
        "(kvwctl.redact; the key from KVW_REDACT_KEY, else random and not stored).",
        key="redact",
    )


def _dtype_option(help: str) -> Any:
    return option(
        "auto", help, key="dtype", choices=DTYPES, shown_default="auto: the stored dtype on a GPU, float32 on the CPU"
    )


def _gamma_option(help: str) -> Any:
    return option(0.02, help, key="gamma", minimum=0, check=_gamma_problem)


def _layers_option(help: str) -> Any:
    return option(":", help, key="layers", check=_layers_problem, shown_default="all")


def _shard_problem(value: str) -> str | None:
    from kvwctl.shards import parse_shard

    return _space_problem(parse_shard)(value)


# --- the stages' options -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileOptions:
    """``kvwctl profile``: knowledge coefficients of a split."""

    split: str = option(help="retain (pooled sums) or forget (per-sample sums)", choices=SPLITS)
    positions: str = option(
        "answer",
        "Profiled positions: answer (those predicting answer tokens), answer-tokens or all",
        key="positions",
        choices=POSITION_MODES,
    )
    batch_size: int = option(8, "Samples per forward pass", key="batch_size", minimum=1)
    device: str = _device_option()
    dtype: str = _dtype_option("auto, float32, bfloat16 or float16")
    device_map: str | None = _device_map_option()
    max_memory: str | None = _max_memory_option()
    offload_folder: str | None = _offload_folder_option()
    vision_cache: str | None = _vision_cache_option()
    redact: bool = _redact_option()
    force: bool = option(False, "Replace an existing output.")
    shard: str | None = option(
        None,
        "Profile only shard K/N of the samples and write a partial profile (kvwctl profile merge joins them)",
        check=_shard_problem,
    )
    checkpoint_every: int | None = option(None, "Checkpoint the sums to <out>.resume every N batches", minimum=1)
    resume: bool = option(False, "Continue from <out>.resume, the checkpoint of an interrupted run.")

    def __post_init__(self) -> None:
        _validate(self)
        _check_placement(self)


@dataclass(frozen=True)
class AccessorOptions:
    """``kvwctl accessor``: exposure from a forget and a retain profile."""

    batch_size: int = option(
        1,
        "Forget samples per accessor batch",
        key="forget_batch_size",
        minimum=1,
        shown_default="1, as the paper",
    )
    save_batches: bool = option(False, "Also store every batch's A_b.")
    redact: bool = _redact_option()
    force: bool = option(False, "Replace an existing output.")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class ApplyOptions:
    """``kvwctl apply``: a new checkpoint with knowledge vectors scaled by exp(-gamma * E).

    ``batch_size`` and ``dtype`` are used by ``--progressive`` only (one-shot apply runs no model).
    """

    gamma: float = _gamma_option("Weakening strength")
    layers: str = _layers_option("Decoder layers, inclusive and 0-based: 2:26, :26, 2:, 0,3,5")
    progressive: bool = option(False, "Algorithm 1: re-profile the weakened model after every forget batch.")
    batch_size: int = option(1, "Forget samples per batch, for --progressive", key="forget_batch_size", minimum=1)
    device: str = _device_option()
    dtype: str = _dtype_option("auto, float32, bfloat16 or float16, for --progressive")
    device_map: str | None = _device_map_option()
    max_memory: str | None = _max_memory_option()
    offload_folder: str | None = _offload_folder_option()
    vision_cache: str | None = _vision_cache_option()
    redact: bool = _redact_option()
    force: bool = option(False, "Replace an existing output.")

    def __post_init__(self) -> None:
        _validate(self)
        _check_placement(self)


def _space_problem(parse: Callable[[str], Any]) -> Callable[[str], str | None]:
    """A check from a parser: the message of the UsageError it raises, or None."""

    def problem(value: str) -> str | None:
        try:
            parse(value)
        except UsageError as error:
            return error.message
        return None

    return problem


def _fold_problem(value: str) -> str | None:
    from kvwctl.folds import parse_fold

    return _space_problem(parse_fold)(value)


@dataclass(frozen=True)
class EvalOptions:
    """``kvwctl eval``: generation and likelihood metrics, with requirements."""

    max_new_tokens: int = option(32, "Generated tokens per sample", key="max_new_tokens", minimum=1)
    batch_size: int = option(8, "Samples per batch", key="batch_size", minimum=1)
    device: str = _device_option()
    dtype: str = _dtype_option("auto, float32, bfloat16 or float16")
    device_map: str | None = _device_map_option()
    max_memory: str | None = _max_memory_option()
    offload_folder: str | None = _offload_folder_option()
    vision_cache: str | None = _vision_cache_option()
    require: tuple[str, ...] = option(
        (),
        "A requirement: SPLIT.METRIC OP EXPR, e.g. 'forget.keyword_acc <= 0.1' or "
        "'retain.keyword_acc >= 0.95*baseline'; repeatable; exit 1 if one fails",
    )
    fold: str | None = option(
        None, "Evaluate only fold K of N (K/N), as tune --folds splits the samples", check=_fold_problem
    )
    group_by: str | None = option(
        None, "Sample field whose value keeps samples in one fold (with --fold)", key="group_by", shown_default="id"
    )
    redact: bool = _redact_option()
    protocol: str | None = option(
        None,
        "Also score by a benchmark's own protocol: mllmu, clear or tofu (kvwctl.protocols)",
        choices=("mllmu", "clear", "tofu"),
        shown_default="none",
    )
    force: bool = option(False, "Replace an existing output.")

    def __post_init__(self) -> None:
        _validate(self)
        _check_placement(self)
        from kvwctl.requirements import parse_requirement

        for text in self.require:
            parse_requirement(text)


@dataclass(frozen=True)
class VerifyOptions:
    """``kvwctl verify``: a checkpoint against its manifest and, with a base, the edit it claims."""

    device: str | None = option(
        None,
        f"Device to recompute edited weights on, with --base: {DEVICE_CHOICES}",
        check=_device_problem,
        shown_default="the device the manifest records (exp may differ in the last bit between devices)",
    )

    def __post_init__(self) -> None:
        _validate(self)


def _gamma_space_problem(value: str) -> str | None:
    from kvwctl.space import gamma_values

    return _space_problem(gamma_values)(value)


def _mean_gate_space_problem(value: str) -> str | None:
    from kvwctl.space import mean_gate_values

    return _space_problem(mean_gate_values)(value)


def _batch_space_problem(value: str) -> str | None:
    from kvwctl.space import batch_sizes

    return _space_problem(batch_sizes)(value)


def _positions_space_problem(value: str) -> str | None:
    from kvwctl.space import position_modes

    return _space_problem(position_modes)(value)


def _layer_space_problem(value: str) -> str | None:
    if value.strip() == "auto":
        return None
    from kvwctl.method import layer_ranges

    def parse(text: str) -> None:
        for item in text.split(","):
            layer_ranges(item)

    return _space_problem(parse)(value)


@dataclass(frozen=True)
class TuneOptions:
    """``kvwctl tune``: search γ (or a mean gate), layers, accessor batch size and positions."""

    gamma: str | None = option(
        None,
        "γ values: a list 0.1,0.3,1 or START:STOP:N or START:STOP:logN",
        key="tune_gamma",
        check=_gamma_space_problem,
        shown_default="0.01:30:log12 unless --mean-gate is given",
    )
    mean_gate: str | None = option(
        None,
        "Mean-gate targets instead of γ (γ solved per trial), same syntax, values in (0, 1), e.g. 0.995:0.6:8",
        key="tune_mean_gate",
        check=_mean_gate_space_problem,
    )
    layers: str = option(
        "auto",
        "Layer selections, comma-separated (14:27,8:27,:) or auto",
        key="tune_layers",
        check=_layer_space_problem,
    )
    forget_batch_size: str = option(
        "1",
        "Accessor batch sizes: a list of integers and all",
        key="tune_forget_batch_size",
        check=_batch_space_problem,
    )
    positions: str = option(
        "answer", "Profile position modes, comma-separated", key="tune_positions", check=_positions_space_problem
    )
    search: str = option("grid", "grid (every combination) or optuna (TPE, two objectives)", choices=("grid", "optuna"))
    trials: int = option(24, "Trials sampled with --search optuna", key="tune_trials", minimum=1)
    seed: int = option(0, "Seed of --search optuna", minimum=0)
    generate_top: int = option(
        6, "Trials of the screen's frontier that are also scored by generation", key="tune_generate_top", minimum=0
    )
    require: tuple[str, ...] = option(
        ("retain.keyword_acc >= 0.95*baseline",),
        "A constraint in eval's --require language; repeatable",
        shown_default="retain.keyword_acc >= 0.95*baseline",
    )
    minimize: str | None = option(
        None, "The objective: SPLIT.METRIC to minimise", shown_default="forget.keyword_acc unless --closest is given"
    )
    closest: str | None = option(None, "The objective: SPLIT.METRIC:reference, as close to the oracle as possible")
    folds: int = option(2, "Evaluation folds: select on one, report on the others, each way", key="folds", minimum=1)
    group_by: str | None = option(
        None, "Sample field whose value keeps samples in one fold (e.g. person)", key="group_by", shown_default="id"
    )
    max_new_tokens: int = option(32, "Generated tokens per sample", key="max_new_tokens", minimum=1)
    batch_size: int = option(8, "Samples per batch (profile, screen and generation)", key="batch_size", minimum=1)
    device: str = _device_option()
    dtype: str = _dtype_option("auto, float32, bfloat16 or float16")
    device_map: str | None = _device_map_option()
    max_memory: str | None = _max_memory_option()
    offload_folder: str | None = _offload_folder_option()
    vision_cache: str | None = _vision_cache_option()
    resume: bool = option(False, "Continue from the trial log of an interrupted run with the same inputs.")
    force: bool = option(False, "Replace an existing output (and start the trial log over).")

    def __post_init__(self) -> None:
        _validate(self)
        _check_placement(self)
        if self.gamma is not None and self.mean_gate is not None:
            raise UsageError("--gamma and --mean-gate are exclusive: search one of them")
        if self.minimize is not None and self.closest is not None:
            raise UsageError("--minimize and --closest are exclusive: give one objective")
        from kvwctl.requirements import parse_requirement

        for text in self.require:
            parse_requirement(text)


@dataclass(frozen=True)
class PlotOptions:
    """``kvwctl plot``: a stage file or report as a PNG; ``gamma`` and ``layers`` as apply takes them."""

    gamma: float = _gamma_option("γ of the gate histogram exp(-γ·E), for an accessor")
    layers: str = _layers_option("Layers of the gate histogram, for an accessor: 2:26, :26, 2:, 0,3,5")
    force: bool = option(False, "Replace an existing output.")

    def __post_init__(self) -> None:
        _validate(self)


STAGE_OPTIONS: tuple[type, ...] = (
    ProfileOptions,
    AccessorOptions,
    ApplyOptions,
    EvalOptions,
    VerifyOptions,
    TuneOptions,
    PlotOptions,
)


# --- help texts and kvw.toml keys ----------------------------------------------------------------


def help_text(cls: type, name: str) -> str:
    """The help of a field with its default and kvw.toml key, for the CLI."""
    item = next(item for item in dataclasses.fields(cls) if item.name == name)
    text: str = item.metadata["help"]
    if _field_types(cls)[name] is bool:
        return text
    notes = []
    shown = item.metadata.get("shown_default")
    if shown is not None:
        notes.append(f"default: {shown}")
    elif item.default is not MISSING and item.default not in ((), None):
        notes.append(f"default: {item.default}")
    if item.metadata.get("key"):
        notes.append(f"kvw.toml: {item.metadata['key']}")
    return f"{text} [{'; '.join(notes)}]" if notes else text


def config_keys() -> dict[str, Any]:
    """Every kvw.toml key an option reads, with the field type it must have."""
    keys: dict[str, Any] = {}
    for cls in STAGE_OPTIONS:
        kinds = _field_types(cls)
        for item in dataclasses.fields(cls):
            key = item.metadata.get("key")
            if key is not None:
                keys.setdefault(key, (kinds[item.name], item.metadata))
    return keys


def check_config_value(key: str, value: Any) -> str | None:
    """The problem with a kvw.toml value, or None (used when kvw.toml is read)."""
    kind, metadata = config_keys()[key]
    return _problem(kind, value, metadata)


# --- filling options by precedence ---------------------------------------------------------------


def _from_environment(text: str, kind: Any) -> Any:
    """A ``KVW_*`` string converted to the field's type (left as text if it does not convert)."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if bool in allowed:
        return {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower(), text)
    try:
        if float in allowed:
            return float(text)
        if int in allowed:
            return int(text)
    except ValueError:
        return text
    return text


def fill(
    cls: type[Options],
    flags: Mapping[str, Any],
    project: ProjectConfig | None = None,
    *,
    environment: Mapping[str, str] | None = None,
) -> Options:
    """Build ``cls`` from flags (None: not given), ``KVW_*`` variables, kvw.toml and defaults."""
    environment = os.environ if environment is None else environment
    kinds = _field_types(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        name, key, kind = item.name, item.metadata.get("key"), kinds[item.name]
        flag = flags.get(name)
        if flag is not None:
            value, source, code = flag, flag_name(name), 2
        elif key is not None and environment_name(key) in environment:
            value = _from_environment(environment[environment_name(key)], kind)
            source, code = environment_name(key), 2
        elif key is not None and project is not None and key in project.values:
            value, source, code = project.values[key], f"{project.source}: {key}", 1
        elif item.default is not MISSING or item.default_factory is not MISSING:
            continue
        else:
            raise UsageError(f"missing {flag_name(name)}")
        problem = _problem(kind, value, item.metadata)
        if problem is not None:
            if code == 2:
                raise UsageError(f"{source} {problem}")
            raise KvwError(f"{source} {problem}")
        values[name] = value
    return cls(**values)
