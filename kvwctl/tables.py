"""The Rich tables the CLI prints on stderr after ``accessor``, ``apply`` and ``eval`` (and ``--dry-run``).

    console.show(eval_table(result.report))

Each function takes a stage's typed result and returns a ``rich.table.Table``; printing it is
the caller's job. No torch here: the results hold plain numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from kvwctl.accessor import AccessorResult
    from kvwctl.metrics import MetricSummary
    from kvwctl.report import EvalReport


def accessor_table(result: AccessorResult) -> Table:
    """A row per layer: its vectors, how many have a positive exposure, the largest and the mean E."""
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
    return table


def apply_table(gamma: float, per_layer: Mapping[int, Any]) -> Table:
    """A row per edited layer: its vectors, how many were scaled, the smallest and the mean gate.

    ``per_layer`` maps a layer to an object with ``vectors``, ``scaled``, ``min_gate`` and
    ``mean_gate`` (the gate being KVW's exp(-gamma * E)).
    """
    table = Table(title=f"gamma = {gamma}", title_justify="left")
    for column in ("layer", "vectors", "scaled", "min gate", "mean gate"):
        table.add_column(column, justify="right")
    for layer, stats in per_layer.items():
        table.add_row(
            str(layer), str(stats.vectors), str(stats.scaled), f"{stats.min_gate:.4g}", f"{stats.mean_gate:.6f}"
        )
    return table


def eval_table(report: EvalReport) -> Table:
    """A row per split.metric (as requirements name them), a column per model, each model's ratio to the baseline."""
    results = report.results
    roles = list(results)
    ratios = [role for role in roles if role != "baseline"] if "baseline" in results else []
    table = Table(
        title="eval (n: samples with the metric)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("split.metric", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for role in roles:
        table.add_column(role, justify="right", no_wrap=True)
    for role in ratios:
        table.add_column(f"{'ref' if role == 'reference' else role}/base", justify="right", no_wrap=True)

    def number(summary: MetricSummary) -> str:
        if summary.non_finite:
            return "non-finite"
        return "-" if summary.mean is None else f"{summary.mean:.4f}"

    def ratio(summary: MetricSummary, baseline: MetricSummary) -> str:
        if summary.mean is None or not baseline.mean:
            return "-"
        return f"{summary.mean / baseline.mean:.3f}"

    for split, metrics in results["model"].items():
        for metric, summary in metrics.items():
            row = [f"{split}.{metric}", str(summary.count)]
            row += [number(results[role][split][metric]) for role in roles]
            row += [ratio(results[role][split][metric], results["baseline"][split][metric]) for role in ratios]
            table.add_row(*row)
        table.add_section()
    return table


def plan_table(facts: Mapping[str, Any]) -> Table:
    """A dry run's plan (``kvwctl.plans``): one row per fact, nested facts as ``key.sub``, lists joined.

    Outputs get a row each: the path, its kind, and whether it exists and would be replaced.
    """
    table = Table(
        title=f"dry run: {facts.get('command')}", show_header=False, title_justify="left", box=None, pad_edge=False
    )

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping) and value and key != "shards":
            for name, item in value.items():
                add(f"{key}.{name}" if key else str(name), item)
        elif isinstance(value, Mapping):  # shard -> bytes
            shown = ", ".join(f"{name} ({size:,} B)" for name, size in value.items())
            table.add_row(Text(f"  {key}"), Text(shown or "-"))
        elif isinstance(value, list | tuple):
            table.add_row(Text(f"  {key}"), Text(", ".join(str(item) for item in value) or "-"))
        elif value is not None:
            table.add_row(Text(f"  {key}"), Text(str(value)))  # paths are text, never markup

    for key, value in facts.items():
        if key == "command":
            continue
        if key == "outputs":
            for output in value:
                state = "replaced (--force)" if output["replaced"] else "exists" if output["exists"] else "new"
                table.add_row(Text(f"  output {output['kind']}"), Text(f"{output['path']} ({state})"))
        else:
            add(key, value)
    return table


def inputs_table(title: str, values: Mapping[str, Any]) -> Table:
    """The resolved inputs and settings of a command, one ``key value`` row each (None omitted)."""
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    from pathlib import Path

    from kvwctl.console import shown_path

    for key, value in values.items():
        if value is not None:
            text = shown_path(value) if isinstance(value, Path) else str(value)
            table.add_row(Text(f"  {key}"), Text(text))  # paths are text, never markup
    return table


def tune_table(report: Mapping[str, Any], *, limit: int = 12) -> Table:
    """The generated trials (else the screen's frontier), and the choice per fold.

    Columns: the trial, its setting (positions, accessor batch, layers), γ, the mean gate, the
    vectors with E > 0, then per evaluated split keyword accuracy (kw, generated trials only) and
    answer log-probability (lp), all samples.
    """
    trials = report["trials"]
    shown = [trials[number] for number in report["generated"]] or [trials[number] for number in report["frontier"]]
    if not shown:
        shown = [trial for trial in trials if trial["results"] is not None]
    table = Table(title=f"tune: {len(trials)} trials, {report['objective']}", title_justify="left")
    splits = sorted({split for trial in shown for split in (trial["results"] or {}).get("all", {})})
    for column in ("trial", "setting", "γ", "gate", "E>0"):
        table.add_column(column, justify="right", no_wrap=column == "setting")
    metric_columns = [(split, metric) for split in splits for metric in ("keyword_acc", "answer_logprob")]
    for split, metric in metric_columns:
        table.add_column(f"{split} {'kw' if metric == 'keyword_acc' else 'lp'}", justify="right")
    table.add_column("chosen", no_wrap=True)

    def cell(results: Mapping[str, Any] | None, split: str, metric: str) -> str:
        value = ((results or {}).get("all", {}).get(split, {}).get(metric) or {}).get("mean")
        return "-" if value is None else f"{value:.3f}"

    for role, name in (("baseline", "vanilla"), ("reference", "oracle")):
        if report.get(role):
            values = [cell(report[role], split, metric) for split, metric in metric_columns]
            table.add_row(name, "", "", "", "", *values, "")
    for trial in shown[:limit]:
        values = [cell(trial["results"], split, metric) for split, metric in metric_columns]
        folds = [str(entry["fold"] or "all") for entry in report["selection"] if entry["trial"] == trial["trial"]]
        table.add_row(
            str(trial["trial"]),
            f"{trial['layers']} b={trial['forget_batch_size']}"
            + ("" if trial["positions"] == "answer" else f" {trial['positions']}"),
            f"{trial['gamma_used']:.3g}" if trial["gamma_used"] is not None else "-",
            f"{trial['mean_gate_reached']:.3f}" if trial["mean_gate_reached"] is not None else "-",
            str(trial["exposed_vectors"]),
            *values,
            ("fold " + ",".join(folds)) if folds else "",
        )
    return table
