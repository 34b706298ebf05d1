"""The ``kvwctl`` command line: parse options, merge them with ``kvw.toml``, call a stage.

    kvwctl profile --split retain        # inputs from kvw.toml in the working directory
    kvwctl profile --split forget
    kvwctl accessor
    kvwctl apply --gamma 0.02 --layers 2:26
    kvwctl eval --require 'forget.keyword_acc <= 0.1' --require 'retain.keyword_acc >= 0.95*baseline'

stdout carries only results (the output path, or JSON with ``--json``); messages, tables and
progress bars go to stderr. Exit codes: 0 success, 1 bad input or failed check (``Error: …`` and
a hint, no traceback unless ``--debug``), 2 usage error, 130 interrupted. Nothing ever prompts.
This is the only module that imports typer; torch is imported only inside command bodies (through
the stage modules' functions), so ``kvwctl --help`` is instant.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from kvwctl import __version__, console
from kvwctl.config import ProjectConfig, load_config, require
from kvwctl.errors import KvwError, UsageError

app = typer.Typer(
    name="kvwctl",
    help="Make a (vision-)language model forget chosen data without training: Knowledge Vector Weakening.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts contain literal [default: …] brackets, not Rich markup
    pretty_exceptions_show_locals=False,  # locals would be multi-GB tensors
)

F = TypeVar("F", bound=Callable[..., Any])

# --- shared options ------------------------------------------------------------------------------

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="kvw.toml to read defaults from [default: ./kvw.toml if present]")
]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="Hub id or local checkpoint directory [kvw.toml: model]")
]
RevisionOption = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit [kvw.toml: revision]")
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N [default: auto]")]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="auto, float32, bfloat16 or float16 [default: auto: stored dtype on GPU, float32 on CPU]"
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the output path.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
PositionsOption = Annotated[
    str | None,
    typer.Option(
        "--positions",
        help="Profiled positions: answer (predicting answer tokens), answer-tokens or all [default: answer]",
    ),
]


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a command (named after the function unless ``name`` is given) and give it the
    single error-handling site of the CLI.

    ``KvwError`` becomes ``Error: …`` plus its hint on stderr and the error's exit code;
    Ctrl-C exits 130. With ``--debug`` the exception propagates with its traceback.
    """
    return functools.partial(_register, name=name)


def _register(function: F, *, name: str | None) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console.set_quiet(bool(kwargs.get("quiet")))
        console.set_library_output(bool(kwargs.get("debug")))
        try:
            return function(*args, **kwargs)
        except KvwError as error:
            if kwargs.get("debug"):
                raise
            stderr = console.stderr_console()
            stderr.print(f"[bold red]Error:[/] {error.message}", markup=True, highlight=False, soft_wrap=True)
            if error.hint:
                stderr.print(f"Hint: {error.hint}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            console.stderr_console().print("Interrupted.")
            raise typer.Exit(130) from None

    app.command(name=name)(wrapper)
    return function


def _emit(path: Path, summary: dict[str, Any], as_json: bool) -> None:
    """The command's result on stdout: its output path, or the whole summary as JSON."""
    if as_json:
        typer.echo(json.dumps({"path": str(path), **summary}, indent=2, default=str))
    else:
        typer.echo(str(path))


def _show_inputs(title: str, values: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    for key, value in values.items():
        if value is not None:
            table.add_row(f"  {key}", str(value))
    console.show(table)


def _revision(flag: str | None, model: str, project: ProjectConfig) -> str | None:
    """``--revision``, else kvw.toml's revision when the model is kvw.toml's model."""
    return flag or (project.revision if model == project.model else None)


def _default(value: Any, config_value: Any, fallback: Any) -> Any:
    if value is not None:
        return value
    return config_value if config_value is not None else fallback


# --- commands ------------------------------------------------------------------------------------


@command()
def profile(
    split: Annotated[str, typer.Option("--split", help="retain (pooled sums) or forget (per-sample sums)")],
    model: ModelOption = None,
    revision: RevisionOption = None,
    data: Annotated[Path | None, typer.Option("--data", help="JSON Lines samples [kvw.toml: splits.<split>]")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output file [default: <workdir>/profile-<split>.safetensors]")
    ] = None,
    positions: PositionsOption = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per forward pass [default: 8]")
    ] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    force: ForceOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Knowledge coefficients of a data split: mean |input| of every down projection."""
    from kvwctl.profile import run_profile

    project = load_config(config)
    model = require(model or project.model, flag="--model", key="model")
    data = require(data or project.split(split), flag="--data", key=f"splits.{split}")
    out = out or project.workdir / f"profile-{split}.safetensors"
    settings = dict(
        split=split,
        revision=_revision(revision, model, project),
        positions=_default(positions, project.positions, "answer"),
        batch_size=_default(batch_size, project.batch_size, 8),
        device=_default(device, project.device, "auto"),
        dtype=_default(dtype, project.dtype, "auto"),
    )
    _show_inputs("profile", {"model": model, "data": data, "out": out, **settings})
    with console.progress_tracker() as tracker:
        result = run_profile(model, data, out, force=force, tracker=tracker, **settings)
    console.info(
        f"Profiled {result.num_samples} samples, {result.num_positions} positions, {result.num_layers} layers "
        f"-> {result.path}"
    )
    _emit(
        result.path,
        {
            "split": split,
            "samples": result.num_samples,
            "positions": result.num_positions,
            "layers": result.num_layers,
            "model_fingerprint": result.fingerprint,
        },
        json_output,
    )


@command()
def accessor(
    forget: Annotated[
        Path | None, typer.Option("--forget", help="Forget profile [default: <workdir>/profile-forget.safetensors]")
    ] = None,
    retain: Annotated[
        Path | None, typer.Option("--retain", help="Retain profile [default: <workdir>/profile-retain.safetensors]")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output file [default: <workdir>/accessor.safetensors]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Forget samples per accessor batch [default: 1, as the paper]")
    ] = None,
    save_batches: Annotated[bool, typer.Option("--save-batches", help="Also store every batch's A_b.")] = False,
    force: ForceOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Forget exposure E = sum over forget batches of max(0, log C_f - log C_r)."""
    from kvwctl.accessor import run_accessor

    project = load_config(config)
    forget = forget or project.workdir / "profile-forget.safetensors"
    retain = retain or project.workdir / "profile-retain.safetensors"
    out = out or project.workdir / "accessor.safetensors"
    batch_size = _default(batch_size, project.forget_batch_size, 1)
    _show_inputs("accessor", {"forget": forget, "retain": retain, "out": out, "batch_size": batch_size})
    result = run_accessor(forget, retain, out, batch_size=batch_size, save_batches=save_batches, force=force)
    table = Table(
        title=f"exposure over {result.num_batches} forget batches of {result.batch_size}", title_justify="left"
    )
    for column in ("layer", "vectors", "A > 0", "max E", "mean E"):
        table.add_column(column, justify="right")
    for summary in result.layers:
        table.add_row(
            str(summary.layer),
            str(summary.vectors),
            f"{summary.exposed} ({summary.exposed / summary.vectors:.0%})",
            f"{summary.max_exposure:.4g}",
            f"{summary.mean_exposure:.4g}",
        )
    console.show(table)
    _emit(
        result.path,
        {
            "batches": result.num_batches,
            "batch_size": result.batch_size,
            "layers": [vars(summary) for summary in result.layers],
        },
        json_output,
    )


@command()
def apply(
    model: ModelOption = None,
    revision: RevisionOption = None,
    accessor_path: Annotated[
        Path | None, typer.Option("--accessor", help="Accessor file [default: <workdir>/accessor.safetensors]")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option("--gamma", help="Weakening strength [kvw.toml: gamma; default: 0.02]")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Decoder layers, inclusive and 0-based: 2:26, :26, 2:, 0,3,5 [default: all]"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output checkpoint directory [default: <workdir>/unlearned]")
    ] = None,
    progressive: Annotated[
        bool, typer.Option("--progressive", help="Algorithm 1: re-profile the weakened model after every forget batch.")
    ] = False,
    forget_data: Annotated[
        Path | None, typer.Option("--forget-data", help="Forget samples, for --progressive [kvw.toml: splits.forget]")
    ] = None,
    retain: Annotated[
        Path | None,
        typer.Option(
            "--retain", help="Retain profile, for --progressive [default: <workdir>/profile-retain.safetensors]"
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Forget samples per batch, for --progressive [default: 1]")
    ] = None,
    exposure_out: Annotated[
        Path | None,
        typer.Option(
            "--exposure-out",
            help="Where --progressive writes the exposure it applied [default: <out>.exposure.safetensors]",
        ),
    ] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    force: ForceOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Write a new checkpoint with knowledge vectors scaled by exp(-gamma * E)."""
    from kvwctl.apply import run_apply
    from kvwctl.progressive import run_progressive

    project = load_config(config)
    model = require(model or project.model, flag="--model", key="model")
    revision = _revision(revision, model, project)
    gamma = _default(gamma, project.gamma, 0.02)
    layers = _default(layers, project.layers, ":")
    out = out or project.workdir / "unlearned"
    device = _default(device, project.device, "auto")
    if progressive:
        if accessor_path is not None:
            raise typer.BadParameter("--accessor does not apply with --progressive", param_hint="--accessor")
        forget_data = require(forget_data or project.split("forget"), flag="--forget-data", key="splits.forget")
        retain = retain or project.workdir / "profile-retain.safetensors"
        settings: dict[str, Any] = dict(
            gamma=gamma,
            layers=layers,
            revision=revision,
            batch_size=_default(batch_size, project.forget_batch_size, 1),
            device=device,
            dtype=_default(dtype, project.dtype, "auto"),
        )
        _show_inputs(
            "apply --progressive",
            {"model": model, "forget_data": forget_data, "retain": retain, "out": out, **settings},
        )
        with console.progress_tracker() as tracker:
            result = run_progressive(
                model, forget_data, retain, out, force=force, exposure_out=exposure_out, tracker=tracker, **settings
            )
    else:
        for flag, value in (
            ("--forget-data", forget_data),
            ("--retain", retain),
            ("--batch-size", batch_size),
            ("--exposure-out", exposure_out),
            ("--dtype", dtype),
        ):
            if value is not None:
                raise typer.BadParameter(f"{flag} applies to --progressive only", param_hint=flag)
        accessor_path = accessor_path or project.workdir / "accessor.safetensors"
        _show_inputs(
            "apply",
            {
                "model": model,
                "accessor": accessor_path,
                "out": out,
                "gamma": gamma,
                "layers": layers,
                "revision": revision,
                "device": device,
            },
        )
        with console.progress_tracker() as tracker:
            result = run_apply(
                model,
                accessor_path,
                out,
                gamma=gamma,
                layers=layers,
                revision=revision,
                device=device,
                force=force,
                tracker=tracker,
            )
    manifest = result.manifest
    console.info(f"Layers edited: {manifest.layers}")
    table = Table(title=f"gamma = {gamma}", title_justify="left")
    for column in ("layer", "vectors", "scaled", "min gate", "mean gate"):
        table.add_column(column, justify="right")
    for layer, edit in manifest.per_layer.items():
        table.add_row(str(layer), str(edit.vectors), str(edit.scaled), f"{edit.min_gate:.4g}", f"{edit.mean_gate:.6f}")
    console.show(table)
    console.info(f"Wrote {result.path}")
    _emit(result.path, {"manifest": manifest.to_json()}, json_output)


def _parse_data_options(values: list[str]) -> dict[str, Path]:
    """``--data NAME=FILE`` (repeatable) as an ordered name -> path mapping."""
    splits: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise UsageError(
                f"invalid --data {value!r}", hint="write --data NAME=FILE, e.g. --data forget=forget.jsonl"
            )
        if name.strip() in splits:
            raise UsageError(f"--data names the split {name.strip()!r} twice")
        splits[name.strip()] = Path(path.strip())
    return splits


@command("eval")
def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Hub id or checkpoint directory to evaluate [default with kvw.toml: <workdir>/unlearned]"
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit of --model")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            help="The model before unlearning, for ratios and requirements "
            "[default with kvw.toml and no --model: model]",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="An oracle model (e.g. never trained on the forget set), for comparison"),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="A split as NAME=FILE (JSON Lines); repeatable [default: kvw.toml [splits]]"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Report file [default: <workdir>/eval.json with kvw.toml, else eval.json]"),
    ] = None,
    samples_out: Annotated[
        Path | None,
        typer.Option("--samples-out", help="Per-sample JSON Lines [default: the report path with .samples.jsonl]"),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            help="A requirement: SPLIT.METRIC OP EXPR, e.g. 'forget.keyword_acc <= 0.1' or "
            "'retain.keyword_acc >= 0.95*baseline'; repeatable; exit 1 if one fails",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Generated tokens per sample [kvw.toml; default: 32]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per batch [kvw.toml; default: 8]")
    ] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    force: ForceOption = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Generation and likelihood metrics of a model (and a baseline) on data splits, with requirements."""
    from kvwctl.evaluate import ModelSpec, run_eval
    from kvwctl.tables import eval_table

    project = load_config(config)
    if model is None and project.source is not None:
        model = str(project.workdir / "unlearned")
        if not Path(model).is_dir():
            raise UsageError(
                "missing --model",
                hint=f"pass --model, or run kvwctl apply first: eval's default model is its output {model}",
            )
        baseline = baseline or project.model
    if model is None:
        raise UsageError(
            "missing --model", hint="pass --model; with a kvw.toml, eval defaults to <workdir>/unlearned (from apply)"
        )
    models = {"model": ModelSpec(model, _revision(revision, model, project))}
    for role, reference_name in (("baseline", baseline), ("reference", reference)):
        if reference_name is not None:
            models[role] = ModelSpec(reference_name, _revision(None, reference_name, project))
    splits = _parse_data_options(data) if data else dict(project.splits)
    if not splits:
        raise UsageError("missing --data", hint="pass --data NAME=FILE (repeatable) or set [splits] in kvw.toml")
    out = out or (project.workdir / "eval.json" if project.source is not None else Path("eval.json"))
    settings = dict(
        max_new_tokens=_default(max_new_tokens, project.max_new_tokens, 32),
        batch_size=_default(batch_size, project.batch_size, 8),
        device=_default(device, project.device, "auto"),
        dtype=_default(dtype, project.dtype, "auto"),
    )
    _show_inputs(
        "eval",
        {
            **{role: spec.reference for role, spec in models.items()},
            **{f"data {name}": path for name, path in splits.items()},
            "out": out,
            **settings,
        },
    )
    with console.progress_tracker() as tracker:
        result = run_eval(
            models,
            splits,
            out,
            samples_out=samples_out,
            requirements=require or [],
            force=force,
            tracker=tracker,
            **settings,
        )
    console.show(eval_table(result.report))
    for outcome in result.report.requirements:
        console.info(f"requirement {outcome.describe()}")
    console.info(f"Wrote {result.path} and {result.samples_path}")
    if result.failed:
        count = len(result.failed)
        raise KvwError(
            f"{count} requirement{'s' if count > 1 else ''} failed: "
            + "; ".join(outcome.describe() for outcome in result.failed),
            hint=f"the report with every requirement's outcome is in {result.path}",
        )
    _emit(result.path, {"samples": str(result.samples_path), **result.report.to_json()}, json_output)


@app.command()
def version() -> None:
    """Print the kvwctl version."""
    typer.echo(__version__)


def main() -> None:
    app()


__all__ = ["app", "main"]
