"""Pictures of kvwctl's files: ``kvwctl plot FILE`` renders a stage file or report as a PNG.

    kvwctl plot kvw-run/accessor.safetensors --gamma 0.02 --layers 2:26   # -> kvw-run/accessor.png
    kvwctl plot kvw-run/eval.json --out eval.png

    run_plot(Path("kvw-run/eval.json"), Path("eval.png"), PlotOptions())   # library use

The kind of picture is chosen by the file's own ``format`` tag (a safetensors file's
``__metadata__``, a JSON report's top-level key), through a registry from format to a render
function (:data:`PLOTTERS`). Adding a picture is one function::

    @plotter("kvwctl.tune/1")
    def tune_figure(path: Path, options: PlotOptions) -> Figure:
        figure, (axes,) = new_figure(1)
        ...                       # read the file, raise ArtifactError for what does not fit
        return figure

What is drawn:

* **accessor** (``kvwctl.accessor/2``, one-shot or progressive exposure): per decoder layer the
  number of knowledge vectors with ``E > 0``, the mean and max exposure, the layers of
  ``--layers`` shaded; and the histogram of the gates ``exp(-γ·E)`` (``method.gates``) over the
  vectors of those layers with ``E > 0`` (a vector with ``E = 0`` keeps gate 1 and is not edited).
* **tune report** (``kvwctl.tune/1``): the screen, the selection and the chosen trial's layers
  (:mod:`kvwctl.tuneplot`);
* **eval report** (``kvwctl.eval/2``, and ``/1``): one panel per metric that matters
  (``keyword_acc``, ``answer_logprob``, ``mc_acc`` where a split has options, and any metric a
  requirement names), grouped bars per split with one bar per role (model, baseline, reference),
  and every requirement drawn on its split's panel as its threshold, marked pass or FAIL.

**Deterministic bytes.** The same input gives the same PNG (with the same matplotlib version): its
own defaults (not the user's matplotlibrc), its bundled DejaVu fonts, the Agg renderer used directly
(``FigureCanvasAgg``: no pyplot, no interactive backend, no global state), a fixed size and dpi, and PNG metadata
without the ``Software`` version string; instead a ``format`` text chunk (``kvwctl.plot/1``)
marks the file as kvwctl's, so ``--force`` may replace it. matplotlib is an optional extra
(``pip install 'kvwctl[plot]'``), imported only inside functions: without it ``plot`` is an error
with that hint, and ``kvwctl --help`` never loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.artifacts import ACCESSOR_FORMAT, read_artifact
from kvwctl.errors import ArtifactError, KvwError, ModelError, UsageError
from kvwctl.files import atomic_file
from kvwctl.options import PlotOptions
from kvwctl.outputs import check_outputs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_FORMAT = "kvwctl.plot/1"  # the PNG text chunk ``format`` of every picture kvwctl writes
EVAL_FORMATS = ("kvwctl.eval/2", "kvwctl.eval/1")
DPI = 100
PANEL_SIZE = (4.6, 3.6)  # inches per panel: 460 x 360 pixels at DPI
INSTALL_HINT = "pip install 'kvwctl[plot]'"

Render = Callable[[Path, PlotOptions], "Figure"]


@dataclass(frozen=True)
class Plotter:
    """How to draw one file format: the render function and the option flags it reads."""

    format: str
    render: Render
    uses: frozenset[str]


PLOTTERS: dict[str, Plotter] = {}


def plotter(*formats: str, uses: Collection[str] = ()) -> Callable[[Render], Render]:
    """Register ``render`` for files tagged with each of ``formats``; ``uses``: the options
    (``gamma``, ``layers``) that mean something for them (others given as flags are refused)."""

    def register(render: Render) -> Render:
        for format in formats:
            PLOTTERS[format] = Plotter(format, render, frozenset(uses))
        return render

    return register


@dataclass(frozen=True)
class PlotResult:
    path: Path
    source: Path
    format: str

    def summary(self) -> dict[str, str]:
        return {"source": str(self.source), "format": self.format}


def default_out(path: Path) -> Path:
    """``FILE`` with the suffix ``.png``: ``kvw-run/accessor.safetensors`` -> ``kvw-run/accessor.png``."""
    return path.with_suffix(".png")


def run_plot(path: Path, out: Path, options: PlotOptions, *, given: Collection[str] = ()) -> PlotResult:
    """Render ``path`` as a PNG at ``out``; ``given``: the option flags the user passed explicitly."""
    import kvwctl.tuneplot  # noqa: F401  (registers the tune file's picture)

    format = file_format(path)
    if format not in PLOTTERS:
        known = ", ".join(sorted(PLOTTERS))
        raise ArtifactError(f"{path} has format {format}; kvwctl plot draws {known}")
    entry = PLOTTERS[format]
    unused = sorted(set(given) - entry.uses)
    if unused:
        raise UsageError(f"--{unused[0]} does not apply to a {format} file ({path})")
    check_outputs(files=[out], inputs=[path], force=options.force)
    _import_matplotlib()
    with _style():
        figure = entry.render(path, options)
        save_png(figure, out)
    return PlotResult(path=out, source=path, format=format)


# --- reading the format tag ----------------------------------------------------------------------


def file_format(path: Path) -> str:
    """The ``format`` tag of a kvwctl file: a JSON report's key, or a safetensors file's metadata."""
    from kvwctl.headers import read_safetensors_header

    if not path.is_file():
        raise ArtifactError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    with path.open("rb") as stream:
        head = stream.read(64).lstrip()
    if head.startswith(b"{"):
        value = read_report(path).get("format")
    else:
        try:
            _, header = read_safetensors_header(path)
        except ModelError as error:
            raise ArtifactError(
                f"{path} is neither a kvwctl report (JSON) nor a stage file (safetensors): {error.message}",
                hint="pass a file written by kvwctl: an accessor, a progressive exposure file or eval's report",
            ) from None
        metadata = header.get("__metadata__")
        value = metadata.get("format") if isinstance(metadata, dict) else None
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{path} has no format tag", hint="pass a file written by kvwctl")
    return value


def read_report(path: Path) -> dict[str, Any]:
    """A JSON report that must hold one object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text") from None
    except (ValueError, RecursionError) as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path} must be a JSON object, got {type(value).__name__}")
    return value


# --- shared figure helpers (every picture uses these) --------------------------------------------


def _import_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise KvwError("kvwctl plot needs matplotlib, which is not installed", hint=INSTALL_HINT) from None


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's defaults whatever the user's matplotlibrc says (its bundled DejaVu Sans font),
    restored afterwards."""
    import matplotlib
    import matplotlib.style

    with matplotlib.rc_context():
        matplotlib.style.use("default")
        matplotlib.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 9})
        yield


def new_figure(columns: int, *, rows: int = 1, title: str | None = None) -> tuple[Figure, list[Axes]]:
    """A figure of ``rows`` x ``columns`` panels of :data:`PANEL_SIZE`, on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PANEL_SIZE
    figure = Figure(figsize=(width * columns, height * rows + (0.4 if title else 0)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure, [panel for row in axes for panel in row]


def save_png(figure: Figure, out: Path) -> None:
    """Write ``figure`` to ``out`` atomically as a PNG whose bytes depend only on the figure."""
    with atomic_file(out) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, metadata={"Software": None, "format": PLOT_FORMAT})


# --- the accessor ---------------------------------------------------------------------------------


@plotter(ACCESSOR_FORMAT, uses=("gamma", "layers"))
def accessor_figure(path: Path, options: PlotOptions) -> Figure:
    """Per layer: vectors with E > 0, mean and max E; the gate histogram of the ``--layers``."""
    import torch
    from matplotlib.ticker import MaxNLocator

    from kvwctl.method import check_gamma, gates, parse_layers, part_layer, summarize_exposures

    artifact = read_artifact(path, ACCESSOR_FORMAT)
    # Per layer every vector of all its parts (dense (m,) and, mixture of experts, (E, m)) flattened.
    by_layer: dict[int, list[torch.Tensor]] = {}
    for part in artifact.parts("exposure"):
        by_layer.setdefault(part_layer(part), []).append(artifact.tensors[f"{part}.exposure"].reshape(-1))
    exposures = [torch.cat(by_layer[layer]) for layer in range(artifact.num_layers)]
    layers = parse_layers(options.layers, artifact.num_layers)
    check_gamma(options.gamma, exposures, layers)
    summaries = summarize_exposures(exposures)
    numbers = [summary.layer for summary in summaries]
    # The exposed vectors of the selected layers, all layers together: (vectors with E > 0,)
    edited = torch.cat([exposures[layer][exposures[layer] > 0] for layer in layers])
    gate = gates(edited, options.gamma).double()

    mode = artifact.metadata.get("mode", "?")
    figure, (count_axes, exposure_axes, gate_axes) = new_figure(
        3, title=f"{path.name}: {mode} exposure of {_short(artifact.metadata['model'])}"
    )
    selected = set(layers)
    colors = ["#1f77b4" if number in selected else "#a6c8e6" for number in numbers]
    count_axes.bar(numbers, [summary.exposed for summary in summaries], color=colors)
    vectors = summaries[0].vectors if len({summary.vectors for summary in summaries}) == 1 else None
    count_axes.set_title("vectors with E > 0" + (f" (of {vectors} per layer)" if vectors else ""))
    count_axes.set_xlabel("layer (dark: --layers)")
    count_axes.set_ylabel("vectors")

    exposure_axes.bar(numbers, [summary.mean_exposure for summary in summaries], color=colors, label="mean E")
    exposure_axes.plot(
        numbers, [summary.max_exposure for summary in summaries], color="#d62728", marker="o", label="max E"
    )
    exposure_axes.set_title("exposure E per layer")
    exposure_axes.set_xlabel("layer (dark: --layers)")
    exposure_axes.set_ylabel("E")
    exposure_axes.legend(loc="best")
    count_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    gate_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (count_axes, exposure_axes):
        axes.set_xticks(numbers if len(numbers) <= 16 else numbers[:: math.ceil(len(numbers) / 16)])

    selection = _layer_list(layers)
    gate_axes.set_title(f"gates exp(-γ·E), γ = {options.gamma:g}, layers {selection}")
    gate_axes.set_xlabel("gate")
    gate_axes.set_ylabel("vectors with E > 0")
    if gate.numel():
        gate_axes.hist(gate.tolist(), bins=40, range=(0.0, 1.0), color="#1f77b4")
        text = f"{gate.numel()} vectors\nmin {float(gate.min()):.4g}\nmean {float(gate.mean()):.4g}"
        gate_axes.text(0.03, 0.95, text, transform=gate_axes.transAxes, va="top")
    else:
        gate_axes.text(0.5, 0.5, "no vector has E > 0", transform=gate_axes.transAxes, ha="center")
    gate_axes.set_xlim(0.0, 1.0)
    return figure


def _layer_list(layers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1:3,7`` (inclusive ranges, as ``--layers`` takes them)."""
    runs: list[list[int]] = []
    for number in layers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}" for run in runs)


# --- the eval report ------------------------------------------------------------------------------

ROLES = ("model", "baseline", "reference")
ROLE_COLORS = {"model": "#1f77b4", "baseline": "#7f7f7f", "reference": "#9467bd"}
PANEL_METRICS = ("keyword_acc", "answer_logprob", "mc_acc")
PASSED_COLOR, FAILED_COLOR = "#1a9850", "#d73027"


@dataclass(frozen=True)
class _Requirement:
    split: str
    metric: str
    operator: str
    threshold: float | None
    passed: bool


def _report_results(path: Path, report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``role -> split -> metric -> mean`` (None: null, non-finite or no samples), checked."""
    results = report.get("results")
    if not isinstance(results, dict) or not isinstance(results.get("model"), dict):
        raise ArtifactError(f"{path}: results has no model", hint="the report is damaged or was not written by eval")
    means: dict[str, dict[str, dict[str, float | None]]] = {}
    for role, splits in results.items():
        if role not in ROLES or not isinstance(splits, dict):
            raise ArtifactError(f"{path}: results.{role} is not a model role's results ({', '.join(ROLES)})")
        means[role] = {}
        for split, metrics in splits.items():
            if not isinstance(metrics, dict):
                raise ArtifactError(f"{path}: results.{role}.{split} is not an object")
            means[role][split] = {}
            for metric, summary in metrics.items():
                mean = summary.get("mean", math.nan) if isinstance(summary, dict) else math.nan
                if mean is not None and not _is_number(mean):
                    raise ArtifactError(f"{path}: results.{role}.{split}.{metric} has no finite numeric mean")
                means[role][split][metric] = None if mean is None else float(mean)
    return means


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _report_requirements(path: Path, report: dict[str, Any]) -> list[_Requirement]:
    from kvwctl.requirements import parse_requirement

    key, text_key = ("requirements", "requirement") if report["format"] == "kvwctl.eval/2" else ("gates", "gate")
    outcomes = report.get(key, [])
    if not isinstance(outcomes, list):
        raise ArtifactError(f"{path}: {key} is not a list")
    parsed = []
    for number, outcome in enumerate(outcomes):
        where = f"{path}: {key}[{number}]"
        if not isinstance(outcome, dict) or not isinstance(outcome.get(text_key), str):
            raise ArtifactError(f"{where} has no {text_key}")
        try:
            requirement = parse_requirement(outcome[text_key])
        except UsageError as error:
            raise ArtifactError(f"{where}: {error.message}") from None
        threshold = outcome.get("threshold")
        if threshold is not None and not _is_number(threshold):
            raise ArtifactError(f"{where}: threshold {threshold!r} is not a number")
        if not isinstance(outcome.get("passed"), bool):
            raise ArtifactError(f"{where}: passed is not true or false")
        parsed.append(
            _Requirement(
                requirement.split,
                requirement.metric,
                requirement.operator,
                None if threshold is None else float(threshold),
                outcome["passed"],
            )
        )
    return parsed


@plotter(*EVAL_FORMATS)
def eval_figure(path: Path, options: PlotOptions) -> Figure:
    """Per metric a panel of grouped bars (split x role), with the requirements drawn."""
    from matplotlib.patches import Patch

    report = read_report(path)
    means = _report_results(path, report)
    requirements = _report_requirements(path, report)
    roles = [role for role in ROLES if role in means]
    splits = list(dict.fromkeys(split for role in roles for split in means[role]))
    present = {metric for role in roles for split in splits for metric, mean in means[role].get(split, {}).items()}
    has_values = {
        metric
        for role in roles
        for split in splits
        for metric, mean in means[role].get(split, {}).items()
        if mean is not None
    }
    metrics = [metric for metric in PANEL_METRICS if metric in has_values or (metric != "mc_acc" and metric in present)]
    metrics += list(dict.fromkeys(r.metric for r in requirements if r.metric not in metrics))
    if not metrics:
        raise ArtifactError(f"{path}: results hold none of the metrics {', '.join(PANEL_METRICS)}")
    for requirement in requirements:
        if requirement.split not in splits:
            raise ArtifactError(f"{path}: a requirement names the split {requirement.split}, which has no results")

    passed = sum(requirement.passed for requirement in requirements)
    title = f"{path.name}: " + ", ".join(f"{role} {_model_name(report, role)}" for role in roles)
    if requirements:
        title += f" — requirements: {passed} of {len(requirements)} passed"
    figure, panels = new_figure(len(metrics), title=title)
    width = 0.8 / len(roles)
    for number, (axes, metric) in enumerate(zip(panels, metrics, strict=True)):
        for index, role in enumerate(roles):
            offset = (index - (len(roles) - 1) / 2) * width
            for position, split in enumerate(splits):
                mean = means[role].get(split, {}).get(metric)
                x = position + offset
                if mean is None:
                    axes.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color=ROLE_COLORS[role])
                    continue
                axes.bar(x, mean, width, color=ROLE_COLORS[role], label=role if position == 0 else None)
                axes.text(x, mean, f"{mean:.3g}", ha="center", va="bottom" if mean >= 0 else "top", fontsize=7)
        for requirement in requirements:
            if requirement.metric == metric:
                _draw_requirement(axes, splits.index(requirement.split), requirement)
        axes.axhline(0, color="black", linewidth=0.6)
        axes.set_xticks(range(len(splits)), splits)
        axes.set_xlim(-0.5, len(splits) - 0.5)
        axes.set_title(metric)
        if metric == "answer_logprob":
            axes.margins(y=0.15)
        else:  # the other metrics are fractions in [0, 1]; a threshold may lie beyond
            thresholds = [r.threshold for r in requirements if r.metric == metric and r.threshold is not None]
            axes.set_ylim(min([0.0, *thresholds]) - 0.05, max([1.0, *thresholds]) + 0.15)
        if number == 0:
            axes.legend(handles=[Patch(color=ROLE_COLORS[role], label=role) for role in roles], loc="best", fontsize=7)
    return figure


def _draw_requirement(axes: Axes, position: int, requirement: _Requirement) -> None:
    """The threshold across the split's bars, green if the requirement passed, red if not."""
    color = PASSED_COLOR if requirement.passed else FAILED_COLOR
    verdict = "pass" if requirement.passed else "FAIL"
    if requirement.threshold is None:  # non-finite: nothing to draw a line at
        axes.text(position, 0, f"{verdict} (non-finite)", ha="center", va="top", color=color, fontsize=7)
        return
    axes.hlines(requirement.threshold, position - 0.45, position + 0.45, colors=color, linestyles="--", linewidth=1.5)
    label = f"{requirement.operator} {requirement.threshold:.3g} {verdict}"
    box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
    axes.text(position + 0.45, requirement.threshold, label, ha="right", va="bottom", color=color, bbox=box)


def _model_name(report: dict[str, Any], role: str) -> str:
    models = report.get("models")
    model = models.get(role) if isinstance(models, dict) else None
    reference = model.get("reference") if isinstance(model, dict) else None
    return _short(reference) if isinstance(reference, str) and reference else "?"


def _short(reference: str) -> str:
    """A model for a title: a local directory (absolute, as kvwctl records it) by its name, a Hub id
    as it is. Decided from the text alone, so the picture does not depend on the working directory."""
    return Path(reference).name if reference.startswith("/") else reference
