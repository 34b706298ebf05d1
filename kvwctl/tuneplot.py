"""The picture of a tune file (``kvwctl.tune/1``), registered with ``kvwctl.plots``.

    kvwctl plot kvw-run/tune.json        # -> kvw-run/tune.png

Three panels:

* **the screen**: every trial a point at its retain and forget ``answer_logprob`` (over every
  evaluation sample), the screen's frontier joined, the generated trials filled, the baseline
  (vanilla) and the reference (oracle) marked, the chosen trial circled;
* **the selection**: the generated trials at the metrics the selection reads — the first
  constraint's ``SPLIT.METRIC`` across, the objective's down — with the constraint's threshold
  (from the baseline or reference, over every sample) as a line, vanilla and oracle, the chosen
  trial circled (a screen-only selection draws the screen's metrics again);
* **the chosen trial's layers**: per edited layer the vectors with E > 0 and their mean gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.errors import ArtifactError
from kvwctl.options import PlotOptions
from kvwctl.plots import new_figure, plotter, read_report
from kvwctl.requirements import parse_requirement

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TUNE_FORMAT = "kvwctl.tune/1"


def _mean(results: dict[str, Any] | None, split: str, metric: str) -> float | None:
    value = (((results or {}).get("all") or {}).get(split) or {}).get(metric) or {}
    mean = value.get("mean") if isinstance(value, dict) else None
    return float(mean) if isinstance(mean, int | float) else None


def _points(
    report: dict[str, Any], trials: list[dict[str, Any]], x: tuple[str, str], y: tuple[str, str]
) -> list[tuple[int, float, float]]:
    points = []
    for trial in trials:
        a, b = _mean(trial.get("results"), *x), _mean(trial.get("results"), *y)
        if a is not None and b is not None:
            points.append((int(trial["trial"]), a, b))
    return points


def _roles(axes: Axes, report: dict[str, Any], x: tuple[str, str], y: tuple[str, str]) -> None:
    for role, marker, label in (("baseline", "s", "vanilla"), ("reference", "D", "oracle")):
        a, b = _mean(report.get(role), *x), _mean(report.get(role), *y)
        if a is not None and b is not None:
            axes.scatter(
                [a],
                [b],
                marker=marker,
                s=50,
                color="black" if role == "baseline" else "tab:green",
                label=label,
                zorder=4,
            )


def _circle(axes: Axes, points: list[tuple[int, float, float]], chosen: int | None) -> None:
    for number, a, b in points:
        if number == chosen:
            axes.scatter(
                [a],
                [b],
                s=260,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=2,
                label=f"chosen: trial {number}",
                zorder=5,
            )


@plotter(TUNE_FORMAT)
def tune_figure(path: Path, options: PlotOptions) -> Figure:
    report = read_report(path)
    try:
        trials: list[dict[str, Any]] = list(report["trials"])
        objective = str(report["objective"])
        requirements = [parse_requirement(text) for text in report["requirements"]]
        chosen = report.get("chosen")
        layers = report.get("chosen_layers") or []
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path} is not a complete tune report: {error}") from None
    kind, _, target = objective.partition(" ")
    y_split, _, y_metric = target.removesuffix(":reference").partition(".")
    retain = requirements[0] if requirements else None
    x_split = retain.split if retain else "retain"
    figure, (screen, selection, per_layer) = new_figure(3, title=f"kvwctl tune: {len(trials)} trials, {objective}")

    # 1. the screen
    x, y = (x_split, "answer_logprob"), (y_split, "answer_logprob")
    points = _points(report, trials, x, y)
    frontier = set(report.get("frontier") or [])
    generated = set(report.get("generated") or [])
    screen.scatter([a for _, a, _ in points], [b for _, _, b in points], s=18, color="tab:gray", label="trial (screen)")
    front = sorted((a, b) for n, a, b in points if n in frontier)
    if front:
        screen.plot([a for a, _ in front], [b for _, b in front], color="tab:blue", linewidth=1, label="frontier")
    filled = [(a, b) for n, a, b in points if n in generated]
    if filled:
        screen.scatter(
            [a for a, _ in filled], [b for _, b in filled], s=30, color="tab:blue", label="generated", zorder=3
        )
    _roles(screen, report, x, y)
    _circle(screen, points, chosen)
    screen.set_xlabel(f"{x_split}.answer_logprob (higher: kept)")
    screen.set_ylabel(f"{y_split}.answer_logprob (lower: forgotten)")
    screen.set_title("screen (teacher-forced)")
    screen.legend(fontsize=7, loc="best")

    # 2. the selection
    x = (x_split, retain.metric if retain else "answer_logprob")
    y = (y_split, y_metric or "answer_logprob")
    chosen_from = [trial for trial in trials if trial["trial"] in generated] or trials
    points = _points(report, chosen_from, x, y)
    selection.scatter([a for _, a, _ in points], [b for _, _, b in points], s=30, color="tab:blue", label="trial")
    for number, a, b in points:
        selection.annotate(str(number), (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _roles(selection, report, x, y)
    if retain is not None:
        base = _mean(report.get(retain.role), retain.split, retain.metric) if retain.role else 1.0
        if base is not None:
            threshold = retain.factor * base + retain.constant if retain.role else retain.constant
            selection.axvline(threshold, color="tab:orange", linestyle="--", linewidth=1, label=retain.text)
    _circle(selection, points, chosen)
    selection.set_xlabel(f"{x[0]}.{x[1]}")
    selection.set_ylabel(f"{y[0]}.{y[1]}")
    selection.set_title("selection (all samples)")
    selection.legend(fontsize=7, loc="best")

    # 3. the chosen trial's layers
    if layers:
        numbers = [row["layer"] for row in layers]
        per_layer.bar(numbers, [row["exposed"] for row in layers], color="tab:blue", label="vectors with E > 0")
        per_layer.set_xlabel("decoder layer")
        if len(numbers) <= 32:
            per_layer.set_xticks(numbers, [str(number) for number in numbers], fontsize=7)
        per_layer.set_ylabel("vectors with E > 0")
        gates = per_layer.twinx()
        gates.plot(
            numbers, [row["mean_gate"] for row in layers], color="tab:red", marker="o", markersize=3, label="mean gate"
        )
        gates.set_ylabel("mean gate exp(-γE) over E > 0", color="tab:red")
        gates.set_ylim(0, 1.05)
        selected = (report.get("selection") or [{}])[0]
        shown = f"trial {chosen}" if chosen is not None else f"closest trial {selected.get('closest')}"
        per_layer.set_title(f"{shown}: its layers")
    else:
        per_layer.text(0.5, 0.5, "no trial chosen", ha="center", va="center", transform=per_layer.transAxes)
        per_layer.set_axis_off()
    return figure
