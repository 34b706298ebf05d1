"""The ``kvwctl`` command line: parse flags, fill a stage's options, call the stage, print.

    kvwctl profile --split retain        # inputs from kvw.toml in the working directory
    kvwctl profile --split forget
    kvwctl accessor
    kvwctl apply --gamma 0.02 --layers 2:26
    kvwctl eval --require 'forget.keyword_acc <= 0.1' --require 'retain.keyword_acc >= 0.95*baseline'

Option values come from the flag, else ``KVW_<KEY>``, else kvw.toml, else the default that the
stage's options dataclass declares (``kvwctl.options``); help texts show those defaults. stdout
carries only results (the output path, or JSON with ``--json``); messages, tables and progress
bars go to stderr. ``--dry-run`` on every command stops after the stage's plan (``kvwctl.plans``):
inputs resolved and checked, the plan shown, nothing loaded or written. Exit codes follow the one
rule in ``kvwctl.errors`` (0, 1 bad input or failed check, 2 usage, 130 interrupted, 143/129
SIGTERM/SIGHUP), applied in the single catch site below;
while a command runs, SIGTERM and SIGHUP raise ``errors.Terminated`` so that outputs are cleaned
up exactly as on Ctrl-C. Nothing ever prompts.
This is the only module that imports typer; torch is imported only inside command bodies
(through the stages), so ``kvwctl --help`` is instant.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from kvwctl import __version__, console
from kvwctl.config import load_config, parse_named_paths, require
from kvwctl.console import show_inputs as _show_inputs
from kvwctl.errors import UsageError, describe, exit_code_for, termination_signals_raise
from kvwctl.options import (
    AccessorOptions,
    ApplyOptions,
    EvalOptions,
    PlotOptions,
    ProfileOptions,
    TuneOptions,
    VerifyOptions,
    fill,
    help_text,
)
from kvwctl.progress import progress_interval

if TYPE_CHECKING:
    from kvwctl.plans import Plan

app = typer.Typer(
    name="kvwctl",
    help="Make a (vision-)language model forget chosen data without training: Knowledge Vector Weakening.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,  # help texts contain literal [default: …] brackets, not Rich markup
    pretty_exceptions_show_locals=False,  # locals would be multi-GB tensors
)

F = TypeVar("F", bound=Callable[..., Any])
StageOptions = TypeVar("StageOptions")
SECRET_ARGUMENTS = frozenset({"token"})  # never written to stderr or --log-file


def _flag(flag: str, help: str) -> Any:
    """A typer option for an input, output or switch that no stage options own (help written here)."""
    return typer.Option(flag, help=help)


def _option(cls: type, name: str, *flags: str) -> Any:
    """A typer option whose help (with its default) comes from the stage's options dataclass."""
    return typer.Option(*(flags or ("--" + name.replace("_", "-"),)), help=help_text(cls, name))


# --- shared options ------------------------------------------------------------------------------

ConfigOption = Annotated[
    Path | None, _flag("--config", "kvw.toml to read defaults from [default: ./kvw.toml if present]")
]
ModelOption = Annotated[str | None, _flag("--model", "Hub id or local checkpoint directory [kvw.toml: model]")]
RevisionOption = Annotated[str | None, _flag("--revision", "Hub branch, tag or commit [kvw.toml: revision]")]
ForceOption = Annotated[bool, _flag("--force", "Replace an existing output.")]
JsonOption = Annotated[bool, _flag("--json", "Print a JSON summary on stdout instead of the output path.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr.")]
DebugOption = Annotated[bool, _flag("--debug", "Show tracebacks.")]
DryRunOption = Annotated[
    bool,
    _flag("--dry-run", "Resolve and check the inputs, print the plan (--json: on stdout) and exit: no model work."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Also debug messages: arguments, timings.")]
LogFileOption = Annotated[
    Path | None, _flag("--log-file", "Append every message, progress line and library warning to this file.")
]
RedactOption = Annotated[
    bool | None,
    typer.Option(
        "--redact/--no-redact",
        help="Write sample ids and data paths as keyed hashes and leave out the texts [kvw.toml: redact]",
        show_default=False,
    ),
]


def _placement_flags(
    device_map: str | None, max_memory: str | None, offload_folder: str | None, vision_cache: str | None
) -> dict[str, str | None]:
    """The device-map and vision-cache flags of a stage that runs a model (``kvwctl.placement``)."""
    return dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, vision_cache=vision_cache)


def _vision_cache_default(options: StageOptions, project: Any) -> StageOptions:
    """``--vision-cache``'s default: ``<workdir>/vision-cache`` when a kvw.toml was read, else off."""
    if getattr(options, "vision_cache", None) is None and project.source is not None:
        return dataclasses.replace(options, vision_cache=str(project.workdir / "vision-cache"))  # type: ignore[type-var]
    return options


def command(
    name: str | None = None, *, register: Callable[[Callable[..., Any]], Any] | None = None
) -> Callable[[F], F]:
    """Register a command (named after the function unless ``name`` is given) and give it the
    single error-handling site of the CLI.

    An error with an exit code (``errors.exit_code_for``) becomes ``Error: …`` plus its hint on
    stderr, printed as plain text; an interrupt exits 130, SIGTERM 143 and SIGHUP 129 (the
    signals are handled only while the command runs). With ``--debug`` the exception
    propagates with its traceback; an exception without an exit code is a bug and always does.
    ``register`` puts the wrapped function elsewhere than ``app.command`` (a group's callback).
    """
    return functools.partial(_register, name=name, register=register)


def _register(function: F, *, name: str | None, register: Callable[[Callable[..., Any]], Any] | None = None) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = dict(
            quiet=bool(kwargs.get("quiet")), verbose=bool(kwargs.get("verbose")), debug=bool(kwargs.get("debug"))
        )
        with console.session(**flags) as session:
            try:
                session.open_log(kwargs.get("log_file"))
                progress_interval()  # a bad KVW_PROGRESS_INTERVAL is a usage error before any work
                given = ", ".join(
                    f"{key}={'<hidden>' if key in SECRET_ARGUMENTS else value}"
                    for key, value in kwargs.items()
                    if value is not None and value is not False and key != "ctx"  # the profile group's typer Context
                )
                console.debug(f"kvwctl {name or function.__name__}: {given}")
                with termination_signals_raise():
                    return function(*args, **kwargs)
            except typer.Exit:
                raise
            except BaseException as error:
                console.log_traceback(error)
                code = exit_code_for(error)
                if code is None or kwargs.get("debug"):
                    raise
                label, message, hint = describe(error)
                console.error(message, hint=hint, label=label)
                raise typer.Exit(code) from None

    (register or app.command(name=name))(wrapper)
    return function


def _emit(path: Path, summary: dict[str, Any], as_json: bool) -> None:
    """The command's result on stdout: its output path, or the whole summary as JSON."""
    if as_json:
        typer.echo(json.dumps({"path": str(path), **summary}, indent=2, default=str, allow_nan=False))
    else:
        typer.echo(str(path))


def _dry_run(plan: Plan, as_json: bool) -> None:
    """A dry run's result: the plan as a table on stderr, and as JSON on stdout with ``--json``."""
    from kvwctl.tables import plan_table

    facts = plan.facts()
    console.show(plan_table(facts))
    console.info("Dry run: nothing was loaded or written.")
    if as_json:
        typer.echo(json.dumps({"dry_run": True, **facts}, indent=2, default=str, allow_nan=False))


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Make a (vision-)language model forget chosen data without training: Knowledge Vector Weakening."""


# --- commands ------------------------------------------------------------------------------------


# `kvwctl profile` is a group: its callback is the profile command itself (`kvwctl profile --split
# retain ...`), and `kvwctl profile merge PART...` joins the partial profiles of `--shard K/N` runs.
profile_app = typer.Typer(
    name="profile", no_args_is_help=False, rich_markup_mode=None, pretty_exceptions_show_locals=False
)
app.add_typer(profile_app)


@command("profile", register=profile_app.callback(invoke_without_command=True))
def profile(
    ctx: typer.Context,
    split: Annotated[str | None, _option(ProfileOptions, "split")] = None,
    model: ModelOption = None,
    revision: RevisionOption = None,
    data: Annotated[Path | None, _flag("--data", "JSON Lines samples [kvw.toml: splits.<split>]")] = None,
    out: Annotated[Path | None, _flag("--out", "Output file [default: <workdir>/profile-<split>.safetensors]")] = None,
    positions: Annotated[str | None, _option(ProfileOptions, "positions")] = None,
    batch_size: Annotated[int | None, _option(ProfileOptions, "batch_size")] = None,
    device: Annotated[str | None, _option(ProfileOptions, "device")] = None,
    dtype: Annotated[str | None, _option(ProfileOptions, "dtype")] = None,
    device_map: Annotated[str | None, _option(ProfileOptions, "device_map")] = None,
    max_memory: Annotated[str | None, _option(ProfileOptions, "max_memory")] = None,
    offload_folder: Annotated[str | None, _option(ProfileOptions, "offload_folder")] = None,
    vision_cache: Annotated[str | None, _option(ProfileOptions, "vision_cache")] = None,
    redact: RedactOption = None,
    force: ForceOption = False,
    shard: Annotated[str | None, _option(ProfileOptions, "shard")] = None,
    checkpoint_every: Annotated[int | None, _option(ProfileOptions, "checkpoint_every")] = None,
    resume: Annotated[bool, _option(ProfileOptions, "resume")] = False,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Knowledge coefficients of a data split: mean |input| of every down projection.

    Under torchrun every rank profiles a share and rank 0 writes; 'profile merge' joins --shard runs.
    """
    if ctx.invoked_subcommand is not None:  # `profile merge ...`: the group's own options are not given
        given = [name for name, value in locals().items() if name != "ctx" and value]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} is not an option of 'profile {ctx.invoked_subcommand}'")
        return
    import contextlib

    from kvwctl.distributed import environment_rank, torchrun_world
    from kvwctl.profile import execute_profile, plan_profile

    project = load_config(config)
    flags = dict(split=split, positions=positions, batch_size=batch_size, device=device, dtype=dtype, force=force)
    flags |= dict(shard=shard, checkpoint_every=checkpoint_every, resume=resume)
    flags |= _placement_flags(device_map, max_memory, offload_folder, vision_cache)
    options = fill(ProfileOptions, flags | {"redact": redact}, project)
    options = _vision_cache_default(options, project)
    spec = project.model_spec(model, revision)
    data = require(data or project.split(options.split), flag="--data", key=f"splits.{options.split}")
    out = out or project.workdir / f"profile-{options.split}.safetensors"
    with contextlib.ExitStack() as stack:
        if environment_rank() > 0:  # torchrun's other ranks: only errors on stderr, nothing on stdout
            stack.enter_context(console.session(quiet=True, debug=debug))
        world = stack.enter_context(torchrun_world(options.device))
        shown = {"model": spec.reference, "data": data, "out": out, "revision": spec.revision}
        _show_inputs("profile", shown | {key: value for key, value in vars(options).items() if key != "force"})
        plan = plan_profile(spec, data, out, options, world=world)
        if dry_run:
            return _dry_run(plan, json_output) if environment_rank() == 0 else None
        with console.progress_tracker() as tracker:
            result = execute_profile(plan, tracker=tracker)
    if not result.written:
        return
    console.info(
        f"Profiled {result.num_samples} samples, {result.num_positions} positions, {result.num_layers} layers "
        f"-> {console.shown_path(result.path)}"
    )
    _emit(result.path, result.summary(), json_output)


@command("merge", register=profile_app.command("merge"))
def profile_merge(
    parts: Annotated[list[Path], typer.Argument(metavar="PART", help="The partial profiles of every shard")],
    out: Annotated[Path, _flag("--out", "The merged profile")],
    force: ForceOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Join the partial profiles of 'profile --shard K/N' runs into the profile one run writes."""
    from kvwctl.shards import run_merge

    result = run_merge(parts, out, force=force)
    console.info(
        f"Merged {result.num_shards} shards: {result.num_samples} samples, {result.num_positions} positions "
        f"-> {console.shown_path(result.path)}"
    )
    _emit(result.path, result.summary(), json_output)


@command()
def accessor(
    forget: Annotated[
        list[Path] | None,
        _flag("--forget", "Forget profile, or repeated: its shards [default: <workdir>/profile-forget.safetensors]"),
    ] = None,
    retain: Annotated[
        list[Path] | None,
        _flag("--retain", "Retain profile, or repeated: its shards [default: <workdir>/profile-retain.safetensors]"),
    ] = None,
    out: Annotated[Path | None, _flag("--out", "Output file [default: <workdir>/accessor.safetensors]")] = None,
    batch_size: Annotated[int | None, _option(AccessorOptions, "batch_size")] = None,
    save_batches: Annotated[bool, _option(AccessorOptions, "save_batches")] = False,
    redact: RedactOption = None,
    force: ForceOption = False,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Forget exposure E = sum over forget batches of max(0, log C_f - log C_r)."""
    from kvwctl.accessor import execute_accessor, plan_accessor
    from kvwctl.tables import accessor_table

    project = load_config(config)
    flags = dict(batch_size=batch_size, save_batches=save_batches, redact=redact, force=force)
    options = fill(AccessorOptions, flags, project)
    forget = forget or [project.workdir / "profile-forget.safetensors"]
    retain = retain or [project.workdir / "profile-retain.safetensors"]
    out = out or project.workdir / "accessor.safetensors"
    shown = {"forget": ", ".join(map(str, forget)), "retain": ", ".join(map(str, retain)), "out": out}
    _show_inputs("accessor", shown | {"batch_size": options.batch_size})
    plan = plan_accessor(forget, retain, out, options)
    if dry_run:
        return _dry_run(plan, json_output)
    result = execute_accessor(plan)
    console.show(accessor_table(result))
    _emit(result.path, result.summary(), json_output)


@command()
def apply(
    model: ModelOption = None,
    revision: RevisionOption = None,
    accessor_path: Annotated[
        Path | None, _flag("--accessor", "Accessor file [default: <workdir>/accessor.safetensors]")
    ] = None,
    gamma: Annotated[float | None, _option(ApplyOptions, "gamma")] = None,
    layers: Annotated[str | None, _option(ApplyOptions, "layers")] = None,
    out: Annotated[Path | None, _flag("--out", "Output checkpoint directory [default: <workdir>/unlearned]")] = None,
    progressive: Annotated[bool, _option(ApplyOptions, "progressive")] = False,
    forget_data: Annotated[
        Path | None, _flag("--forget-data", "Forget samples, for --progressive [kvw.toml: splits.forget]")
    ] = None,
    retain: Annotated[
        Path | None,
        _flag("--retain", "Retain profile, for --progressive [default: <workdir>/profile-retain.safetensors]"),
    ] = None,
    batch_size: Annotated[int | None, _option(ApplyOptions, "batch_size")] = None,
    exposure_out: Annotated[
        Path | None,
        _flag(
            "--exposure-out",
            "Where --progressive writes the exposure it applied [default: <out>.exposure.safetensors]",
        ),
    ] = None,
    device: Annotated[str | None, _option(ApplyOptions, "device")] = None,
    dtype: Annotated[str | None, _option(ApplyOptions, "dtype")] = None,
    device_map: Annotated[str | None, _option(ApplyOptions, "device_map")] = None,
    max_memory: Annotated[str | None, _option(ApplyOptions, "max_memory")] = None,
    offload_folder: Annotated[str | None, _option(ApplyOptions, "offload_folder")] = None,
    vision_cache: Annotated[str | None, _option(ApplyOptions, "vision_cache")] = None,
    eval_report: Annotated[Path | None, _flag("--eval", "An eval report of this output, for the model card")] = None,
    redact: RedactOption = None,
    force: ForceOption = False,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Write a new checkpoint with knowledge vectors scaled by exp(-gamma * E)."""
    from kvwctl.tables import apply_table

    project = load_config(config)
    progressive_only = dict(forget_data=forget_data, retain=retain, batch_size=batch_size, dtype=dtype)
    progressive_only |= _placement_flags(device_map, max_memory, offload_folder, vision_cache)
    given = {"accessor": accessor_path} if progressive else {**progressive_only, "exposure_out": exposure_out}
    for name, value in given.items():
        if value is not None:
            applies = "does not apply with --progressive" if progressive else "applies to --progressive only"
            raise UsageError(f"--{name.replace('_', '-')} {applies}")
    flags = dict(gamma=gamma, layers=layers, progressive=progressive, batch_size=batch_size, device=device)
    flags |= _placement_flags(device_map, max_memory, offload_folder, vision_cache)
    options = fill(ApplyOptions, {**flags, "dtype": dtype, "redact": redact, "force": force}, project)
    options = _vision_cache_default(options, project) if options.progressive else options
    spec = project.model_spec(model, revision)
    out = out or project.workdir / "unlearned"
    common = {"model": spec.reference, "out": out, "revision": spec.revision, "gamma": options.gamma}
    common |= {"layers": options.layers, "device": options.device}
    plan: Plan
    if options.progressive:
        from kvwctl.progressive import execute_progressive, plan_progressive

        forget_data = require(forget_data or project.split("forget"), flag="--forget-data", key="splits.forget")
        retain = retain or project.workdir / "profile-retain.safetensors"
        extra = {"batch_size": options.batch_size, "dtype": options.dtype}
        _show_inputs("apply --progressive", {"forget_data": forget_data, "retain": retain, **common, **extra})
        plan = plan_progressive(
            spec, forget_data, retain, out, options, exposure_out=exposure_out, eval_report=eval_report
        )
        execute: Callable[..., Any] = execute_progressive
    else:
        from kvwctl.apply import execute_apply, plan_apply

        accessor_path = accessor_path or project.workdir / "accessor.safetensors"
        _show_inputs("apply", {"accessor": accessor_path, **common})
        plan, execute = plan_apply(spec, accessor_path, out, options, eval_report=eval_report), execute_apply
    if dry_run:
        return _dry_run(plan, json_output)
    with console.progress_tracker() as tracker:
        result = execute(plan, tracker=tracker)
    manifest = result.manifest
    console.info(f"Layers edited: {manifest.layers}")
    console.show(apply_table(options.gamma, manifest.per_layer))
    console.info(f"Wrote {console.shown_path(result.path)}")
    _emit(result.path, {"manifest": manifest.to_json()}, json_output)


@command("eval")
def evaluate(
    model: Annotated[
        str | None,
        _flag("--model", "Hub id or checkpoint directory to evaluate [default with kvw.toml: <workdir>/unlearned]"),
    ] = None,
    revision: Annotated[str | None, _flag("--revision", "Hub branch, tag or commit of --model")] = None,
    baseline: Annotated[
        str | None,
        _flag(
            "--baseline",
            "The model before unlearning, for ratios and requirements [default with kvw.toml and no --model: model]",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        _flag("--reference", "An oracle model (e.g. never trained on the forget set), for comparison"),
    ] = None,
    data: Annotated[
        list[str] | None,
        _flag("--data", "A split as NAME=FILE (JSON Lines); repeatable [default: kvw.toml [splits]]"),
    ] = None,
    out: Annotated[
        Path | None,
        _flag("--out", "Report file [default: <workdir>/eval.json with kvw.toml, else eval.json]"),
    ] = None,
    samples_out: Annotated[
        Path | None,
        _flag("--samples-out", "Per-sample JSON Lines [default: the report path with .samples.jsonl]"),
    ] = None,
    require_: Annotated[list[str] | None, _option(EvalOptions, "require", "--require")] = None,
    max_new_tokens: Annotated[int | None, _option(EvalOptions, "max_new_tokens")] = None,
    batch_size: Annotated[int | None, _option(EvalOptions, "batch_size")] = None,
    device: Annotated[str | None, _option(EvalOptions, "device")] = None,
    dtype: Annotated[str | None, _option(EvalOptions, "dtype")] = None,
    device_map: Annotated[str | None, _option(EvalOptions, "device_map")] = None,
    max_memory: Annotated[str | None, _option(EvalOptions, "max_memory")] = None,
    offload_folder: Annotated[str | None, _option(EvalOptions, "offload_folder")] = None,
    vision_cache: Annotated[str | None, _option(EvalOptions, "vision_cache")] = None,
    fold: Annotated[str | None, _option(EvalOptions, "fold")] = None,
    group_by: Annotated[str | None, _option(EvalOptions, "group_by")] = None,
    protocol: Annotated[str | None, _option(EvalOptions, "protocol")] = None,
    redact: RedactOption = None,
    force: ForceOption = False,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Generation and likelihood metrics of a model (and a baseline) on data splits, with requirements."""
    from kvwctl.evaluate import execute_eval, plan_eval
    from kvwctl.tables import eval_table

    project = load_config(config)
    flags = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype, force=force)
    flags |= dict(fold=fold, group_by=group_by, redact=redact, protocol=protocol)
    flags |= _placement_flags(device_map, max_memory, offload_folder, vision_cache)
    options = fill(EvalOptions, {**flags, "require": tuple(require_) if require_ else None}, project)
    options = _vision_cache_default(options, project)
    models = project.eval_models(model, revision, baseline=baseline, reference=reference)
    splits = parse_named_paths(data, flag="--data") if data else dict(project.splits)
    if not splits:
        raise UsageError("missing --data", hint="pass --data NAME=FILE (repeatable) or set [splits] in kvw.toml")
    out = out or (project.workdir / "eval.json" if project.source is not None else Path("eval.json"))
    shown: dict[str, object] = {role: spec.reference for role, spec in models.items()}
    shown |= {f"data {name}": path for name, path in splits.items()}
    settings = {key: value for key, value in vars(options).items() if key not in ("require", "force")}
    _show_inputs("eval", {**shown, "out": out, **settings})
    plan = plan_eval(models, splits, out, options, samples_out=samples_out)
    if dry_run:
        return _dry_run(plan, json_output)
    with console.progress_tracker() as tracker:
        result = execute_eval(plan, tracker=tracker)
    console.show(eval_table(result.report))
    if result.report.protocol:
        from kvwctl.protocols import protocol_table

        console.show(protocol_table(result.report.protocol))
    if result.report.non_finite:
        console.error(
            "non-finite (NaN or infinite) metrics, recorded as null: " + ", ".join(result.report.non_finite),
            hint="the model gives NaN or infinite log-probabilities; check its weights",
            label="Warning:",
        )
    for outcome in result.report.requirements:
        console.info(f"requirement {outcome.describe()}")
    console.info(f"Wrote {console.shown_path(result.path)} and {console.shown_path(result.samples_path)}")
    summary = {"samples": str(result.samples_path), **result.report.to_json()}
    failure = result.failure()
    if failure is not None and not json_output:
        raise failure
    _emit(result.path, summary, json_output)  # with --json also on failure: the report is the result
    if failure is not None:
        raise failure


@command()
def tune(
    model: ModelOption = None,
    revision: RevisionOption = None,
    retain_data: Annotated[
        Path | None, _flag("--retain-data", "Retain samples to profile [kvw.toml: splits.retain]")
    ] = None,
    forget_data: Annotated[
        Path | None, _flag("--forget-data", "Forget samples to profile [kvw.toml: splits.forget]")
    ] = None,
    data: Annotated[
        list[str] | None,
        _flag("--data", "An evaluation split as NAME=FILE; repeatable [default: kvw.toml [splits]]"),
    ] = None,
    reference: Annotated[
        str | None,
        _flag("--reference", "An oracle model (never trained on the forget set), for --closest and the table"),
    ] = None,
    gamma: Annotated[str | None, _option(TuneOptions, "gamma")] = None,
    mean_gate: Annotated[str | None, _option(TuneOptions, "mean_gate")] = None,
    layers: Annotated[str | None, _option(TuneOptions, "layers")] = None,
    forget_batch_size: Annotated[str | None, _option(TuneOptions, "forget_batch_size")] = None,
    positions: Annotated[str | None, _option(TuneOptions, "positions")] = None,
    search: Annotated[str | None, _option(TuneOptions, "search")] = None,
    trials: Annotated[int | None, _option(TuneOptions, "trials")] = None,
    seed: Annotated[int | None, _option(TuneOptions, "seed")] = None,
    generate_top: Annotated[int | None, _option(TuneOptions, "generate_top")] = None,
    require_: Annotated[list[str] | None, _option(TuneOptions, "require", "--require")] = None,
    minimize: Annotated[str | None, _option(TuneOptions, "minimize")] = None,
    closest: Annotated[str | None, _option(TuneOptions, "closest")] = None,
    folds: Annotated[int | None, _option(TuneOptions, "folds")] = None,
    group_by: Annotated[str | None, _option(TuneOptions, "group_by")] = None,
    max_new_tokens: Annotated[int | None, _option(TuneOptions, "max_new_tokens")] = None,
    batch_size: Annotated[int | None, _option(TuneOptions, "batch_size")] = None,
    device: Annotated[str | None, _option(TuneOptions, "device")] = None,
    dtype: Annotated[str | None, _option(TuneOptions, "dtype")] = None,
    device_map: Annotated[str | None, _option(TuneOptions, "device_map")] = None,
    max_memory: Annotated[str | None, _option(TuneOptions, "max_memory")] = None,
    offload_folder: Annotated[str | None, _option(TuneOptions, "offload_folder")] = None,
    vision_cache: Annotated[str | None, _option(TuneOptions, "vision_cache")] = None,
    out: Annotated[Path | None, _flag("--out", "Tune report [default: <workdir>/tune.json]")] = None,
    apply_out: Annotated[
        Path | None, _flag("--apply", "Also write the chosen trial's checkpoint here, through apply")
    ] = None,
    resume: Annotated[bool, _option(TuneOptions, "resume")] = False,
    force: ForceOption = False,
    dry_run: DryRunOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Search gamma (or a mean gate), layers, accessor batch size and positions; choose under constraints."""
    from kvwctl.source import ModelSpec
    from kvwctl.tables import tune_table
    from kvwctl.tune import TuneInputs, execute_tune, plan_tune

    project = load_config(config)
    flags = dict(
        gamma=gamma, mean_gate=mean_gate, layers=layers, forget_batch_size=forget_batch_size, positions=positions,
        search=search, trials=trials, seed=seed, generate_top=generate_top, minimize=minimize, closest=closest,
        folds=folds, group_by=group_by, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
        dtype=dtype, resume=resume, force=force, require=tuple(require_) if require_ else None,
    )  # fmt: skip
    flags |= _placement_flags(device_map, max_memory, offload_folder, vision_cache)
    options = fill(TuneOptions, flags, project)
    options = _vision_cache_default(options, project)
    spec = project.model_spec(model, revision)
    retain_data = require(retain_data or project.split("retain"), flag="--retain-data", key="splits.retain")
    forget_data = require(forget_data or project.split("forget"), flag="--forget-data", key="splits.forget")
    splits = parse_named_paths(data, flag="--data") if data else dict(project.splits)
    out = out or project.workdir / "tune.json"
    inputs = TuneInputs(
        model=spec,
        retain_data=retain_data,
        forget_data=forget_data,
        splits=splits,
        out=out,
        profiles_dir=project.workdir / "tune-profiles",
        reference=ModelSpec(reference, None) if reference else None,
    )
    shown: dict[str, object] = {"model": spec.reference, "retain_data": retain_data, "forget_data": forget_data}
    shown |= {f"data {name}": path for name, path in splits.items()}
    settings = {key: value for key, value in vars(options).items() if key not in ("force", "resume")}
    _show_inputs("tune", {**shown, "reference": reference, "out": out, "apply": apply_out, **settings})
    plan = plan_tune(inputs, options, apply_out=apply_out)
    if dry_run:
        return _dry_run(plan, json_output)
    with console.progress_tracker() as tracker:
        result = execute_tune(plan, tracker=tracker)
    console.show(tune_table(result.report))
    for entry in result.report["selection"]:
        where = f"fold {entry['fold']}" if entry["fold"] else "all samples"
        picked = f"trial {entry['trial']}" if entry["trial"] is not None else f"no trial (closest: {entry['closest']})"
        console.info(f"selected on {where}: {picked}")
    console.info(f"Wrote {console.shown_path(result.path)} (trial log: {console.shown_path(result.log_path)})")
    if result.applied is not None:
        console.info(f"Applied trial {result.chosen}: {console.shown_path(result.applied)}")
    failure = result.failure()
    summary = {"log": str(result.log_path), "applied": str(result.applied) if result.applied else None}
    summary |= {key: result.report[key] for key in ("chosen", "selection", "frontier", "generated")}
    if failure is not None and not json_output:
        raise failure
    _emit(result.path, summary, json_output)
    if failure is not None:
        raise failure


@command()
def verify(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A checkpoint directory written by apply")],
    base: Annotated[str | None, _flag("--base", "The model it was made from, to recompute the edit")] = None,
    revision: Annotated[str | None, _flag("--revision", "Hub branch, tag or commit of --base")] = None,
    accessor_path: Annotated[Path | None, _flag("--accessor", "Its accessor or exposure file (with --base)")] = None,
    device: Annotated[str | None, _option(VerifyOptions, "device")] = None,
    dry_run: DryRunOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Check a checkpoint against its kvw_manifest.json; with --base and --accessor, recompute the edit."""
    from kvwctl.source import ModelSpec
    from kvwctl.verify import execute_verify, plan_verify

    if (base is None) != (accessor_path is None) or (revision is not None and base is None):
        raise UsageError("--base and --accessor go together (and --revision needs --base)")
    options = fill(VerifyOptions, {"device": device})
    spec = ModelSpec(base, revision) if base is not None else None
    plan = plan_verify(checkpoint_dir, options, base=spec, accessor=accessor_path)
    if dry_run:
        return _dry_run(plan, json_output)
    with console.progress_tracker() as tracker:
        result = execute_verify(plan, tracker=tracker)
    console.info("Verified: " + "; ".join(result.checks))
    _emit(result.path, result.to_json(), json_output)


@command()
def card(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A checkpoint directory written by apply")],
    eval_report: Annotated[Path | None, _flag("--eval", "An eval report (eval.json) of this checkpoint")] = None,
    force: Annotated[bool, _flag("--force", "Replace a README.md that kvwctl did not write.")] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """(Re)write DIR/README.md, the model card, from kvw_manifest.json and optionally an eval report."""
    from kvwctl.card import run_card

    result = run_card(checkpoint_dir, eval_report=eval_report, force=force)
    console.info(f"Wrote {console.shown_path(result.path)}")
    _emit(result.path, result.to_json(), json_output)


@command()
def push(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A checkpoint directory written by apply")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO", help="Hub model repository, owner/name")],
    revision: Annotated[
        str | None, _flag("--revision", "Branch to push to (created if missing) [default: main]")
    ] = None,
    private: Annotated[bool, _flag("--private", "Create the repository private (if it does not exist).")] = False,
    create_pr: Annotated[bool, _flag("--create-pr", "Open a pull request against main instead of committing.")] = False,
    token: Annotated[str | None, _flag("--token", "Hub token [default: HF_TOKEN or the saved login]")] = None,
    dry_run: DryRunOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Upload a checkpoint (checked as verify DIR checks it) to the Hugging Face Hub."""
    from kvwctl.push import execute_push, plan_push

    if quiet:  # huggingface_hub's upload progress goes to stderr otherwise
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()
    plan = plan_push(checkpoint_dir, repo_id, revision=revision, private=private, create_pr=create_pr)
    if dry_run:
        return _dry_run(plan, json_output)
    with console.progress_tracker() as tracker:
        result = execute_push(plan, token=token, tracker=tracker)
    console.info(f"Pushed {console.shown_path(result.path)} to {result.repo_url} ({result.revision})")
    if json_output:
        _emit(result.path, result.to_json(), True)
    else:
        typer.echo(result.pr_url or result.commit_url)


@command()
def plot(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="An accessor or exposure file, or eval's report")],
    out: Annotated[Path | None, _flag("--out", "The PNG to write [default: FILE with .png]")] = None,
    gamma: Annotated[float | None, _option(PlotOptions, "gamma")] = None,
    layers: Annotated[str | None, _option(PlotOptions, "layers")] = None,
    force: ForceOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Draw a stage file or eval report as a PNG (needs matplotlib: pip install 'kvwctl[plot]')."""
    from kvwctl.plots import default_out, run_plot

    flags = dict(gamma=gamma, layers=layers)
    options = fill(PlotOptions, {**flags, "force": force}, load_config(config))
    given = [name for name, value in flags.items() if value is not None]
    result = run_plot(file, out or default_out(file), options, given=given)
    console.info(f"Wrote {console.shown_path(result.path)} ({result.format})")
    _emit(result.path, result.summary(), json_output)


@command()
def architectures(json_output: JsonOption = False, debug: DebugOption = False) -> None:
    """List the supported model types: modality, module path in memory, on-disk layouts, vector axis."""
    from kvwctl.architectures import REGISTRY

    families = [REGISTRY[model_type] for model_type in sorted(REGISTRY)]
    if json_output:
        typer.echo(json.dumps([family.to_json() for family in families], indent=2))
        return
    # One tab-separated line per model type (cut -f1 gives the names); the header goes to stderr.
    console.info("model_type\tmodality\tin memory (transformers 5)\ton disk\tvector axis")
    for family in families:
        modality = "image+text" if family.multimodal else "text"
        axis = "rows (0)" if family.vector_axis == 0 else "columns (1)"
        layouts = " | ".join(family.disk_layouts)
        typer.echo(f"{family.model_type}\t{modality}\t{family.module_path}\t{layouts}\t{axis}")


# --- data: benchmark adapters ------------------------------------------------------------------

data_app = typer.Typer(no_args_is_help=True, help="Benchmark data: convert a published benchmark to kvwctl samples.")
app.add_typer(data_app, name="data")


@command("convert", register=data_app.command("convert"))
def data_convert(
    benchmark: Annotated[str, typer.Argument(metavar="BENCH", help="mllmu, clear or tofu")],
    source: Annotated[Path, _flag("--from", "The benchmark as published, a local directory (parquet or JSON)")],
    split: Annotated[str, _flag("--split", "The benchmark's split, e.g. forget_5 (mllmu), forget05 (clear)")],
    out: Annotated[Path, _flag("--out", "The JSON Lines file to write; images go to <out stem>.images/")],
    task: Annotated[
        list[str] | None, _flag("--task", "Keep only this task kind (repeatable), e.g. caption [default: all]")
    ] = None,
    force: ForceOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    log_file: LogFileOption = None,
    debug: DebugOption = False,
) -> None:
    """Convert a local copy of MLLMU-Bench, CLEAR or TOFU into kvwctl's JSON Lines (images as files)."""
    from kvwctl.benchmarks.convert import run_convert

    result = run_convert(benchmark, source, split, out, tasks=tuple(task or ()), force=force)
    tasks = ", ".join(f"{count} {kind}" for kind, count in result.tasks.items())
    console.info(f"Wrote {console.shown_path(result.path)}: {result.samples} samples ({tasks}), {result.images} images")
    _emit(result.path, result.summary(), json_output)


@app.command()
def version() -> None:
    """Print the kvwctl version."""
    typer.echo(__version__)


def main() -> None:
    app()


__all__ = ["app", "main"]
