"""kvwctl plot: the figures drawn from hand-made files, their bytes, and every error path.

The accessor and the report are written by hand (no model runs), so every number drawn can be
checked against a value computed here: exposures ``E`` of 3 layers x 4 vectors and ``γ = 0.5``.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import expect_error, invoke
from safetensors.torch import save_file

from kvwctl.artifacts import ACCESSOR_FORMAT, write_artifact
from kvwctl.errors import KvwError
from kvwctl.options import PlotOptions
from kvwctl.plots import PLOT_FORMAT, PLOTTERS, accessor_figure, eval_figure, run_plot

EXPOSURES = {
    "layers.0.exposure": [0.0, 1.0, 2.0, 0.0],
    "layers.1.exposure": [0.5, 0.0, 0.0, 0.0],
    "layers.2.exposure": [3.0, 1.0, 0.0, 4.0],
}
METADATA = {
    "format": ACCESSOR_FORMAT,
    "model": "tiny",
    "model_fingerprint": "f" * 64,
    "model_revision": "",
    "model_type": "qwen2",
    "num_layers": "3",
    "positions": "answer",
    "mode": "one-shot",
    "batch_size": "1",
}


def write_accessor(path: Path, exposures: dict[str, list[float]] = EXPOSURES) -> Path:
    write_artifact(path, {name: torch.tensor(values) for name, values in exposures.items()}, METADATA)
    return path


def summary(mean: float | None, count: int = 2) -> dict[str, Any]:
    return {"mean": mean, "count": count}


def report_json(*, keyword_forget: float = 0.25) -> dict[str, Any]:
    """An eval report of a model and a baseline on forget (with options) and retain (without)."""

    def split(keyword: float, logprob: float, mc: float | None) -> dict[str, Any]:
        return {
            "rougeL_recall": summary(0.5),
            "rougeL_f1": summary(0.5),
            "keyword_acc": summary(keyword),
            "answer_logprob": summary(logprob),
            "mc_acc": summary(mc, 0 if mc is None else 1),
        }

    return {
        "format": "kvwctl.eval/2",
        "tool_version": "0.1.0",
        "models": {
            "model": {
                "reference": "/runs/kvw-run/unlearned",
                "revision": None,
                "fingerprint": "a",
                "model_type": "qwen2",
            },
            "baseline": {"reference": "org/model", "revision": None, "fingerprint": "b", "model_type": "qwen2"},
        },
        "data": {},
        "settings": {},
        "metrics": ["rougeL_recall", "rougeL_f1", "keyword_acc", "answer_logprob", "mc_acc"],
        "results": {
            "model": {"forget": split(keyword_forget, -3.5, 0.0), "retain": split(0.75, -1.2, None)},
            "baseline": {"forget": split(1.0, -0.5, 1.0), "retain": split(1.0, -0.8, None)},
        },
        "non_finite": [],
        "requirements": [
            {"requirement": "forget.keyword_acc <= 0.1", "value": keyword_forget, "threshold": 0.1, "passed": False},
            {"requirement": "retain.keyword_acc >= 0.7*baseline", "value": 0.75, "threshold": 0.7, "passed": True},
            {"requirement": "retain.rougeL_f1 >= 0.4", "value": 0.5, "threshold": 0.4, "passed": True},
        ],
        "samples_sha256": "z",
    }


def write_report(path: Path, report: dict[str, Any] | None = None) -> Path:
    path.write_text(json.dumps(report or report_json(), indent=2) + "\n")
    return path


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG, CRCs checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        position += 12 + length
    return chunks


def bar_heights(axes: Any) -> list[float]:
    return [round(patch.get_height(), 6) for patch in axes.patches]


def numbers(values: Any) -> list[float]:
    return [float(value) for value in values]


def rgb(color: Any) -> tuple[float, ...]:
    """An RGBA colour's red, green and blue, rounded to 3 decimals."""
    return tuple(round(float(value), 3) for value in color[:3])


# --- the accessor figure -------------------------------------------------------------------------


def test_accessor_figure_draws_the_hand_computed_numbers(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    figure = accessor_figure(accessor, PlotOptions(gamma=0.5))
    count_axes, exposure_axes, gate_axes = figure.axes
    assert bar_heights(count_axes) == [2, 1, 3]  # vectors with E > 0 per layer
    assert bar_heights(exposure_axes) == [0.75, 0.125, 2.0]  # mean E: 3/4, 0.5/4, 8/4
    (maximum,) = exposure_axes.lines
    assert numbers(maximum.get_ydata()) == [2.0, 0.5, 4.0]
    # The gates exp(-0.5 E) of the 6 vectors with E > 0, in 40 bins of width 0.025 over [0, 1].
    gates = [math.exp(-0.5 * value) for values in EXPOSURES.values() for value in values if value > 0]
    counts = [0] * 40
    for gate in gates:
        counts[int(gate / 0.025)] += 1
    assert bar_heights(gate_axes) == counts and sum(counts) == 6
    texts = [text.get_text() for text in gate_axes.texts]
    assert texts == [f"6 vectors\nmin {math.exp(-2.0):.4g}\nmean {sum(gates) / 6:.4g}"]
    assert texts[0] == "6 vectors\nmin 0.1353\nmean 0.453"
    assert gate_axes.get_title() == "gates exp(-γ·E), γ = 0.5, layers 0:2"


def test_accessor_layers_select_the_histogram_and_shade_the_bars(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    figure = accessor_figure(accessor, PlotOptions(gamma=0.5, layers="1"))
    count_axes, _, gate_axes = figure.axes
    assert sum(bar_heights(gate_axes)) == 1  # layer 1 has one vector with E > 0: gate exp(-0.25)
    assert gate_axes.texts[0].get_text() == f"1 vectors\nmin {math.exp(-0.25):.4g}\nmean {math.exp(-0.25):.4g}"
    dark, light = (0.122, 0.467, 0.706), (0.651, 0.784, 0.902)
    colors = [rgb(patch.get_facecolor()) for patch in count_axes.patches]
    assert colors == [light, dark, light]
    assert gate_axes.get_title().endswith("layers 1")


def test_accessor_without_exposed_vectors_says_so(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    figure = accessor_figure(accessor, PlotOptions(layers="1:1"))
    assert figure.axes[2].texts[0].get_text() == "1 vectors\nmin 0.99\nmean 0.99"  # exp(-0.02 * 0.5)
    zero = {name: [0.0] * 4 for name in EXPOSURES}
    figure = accessor_figure(write_accessor(tmp_path / "zero.safetensors", zero), PlotOptions())
    assert [text.get_text() for text in figure.axes[2].texts] == ["no vector has E > 0"]
    assert bar_heights(figure.axes[0]) == [0, 0, 0]


# --- the eval figure -----------------------------------------------------------------------------


def test_eval_figure_draws_bars_per_split_and_role_and_every_requirement(tmp_path: Path) -> None:
    figure = eval_figure(write_report(tmp_path / "eval.json"), PlotOptions())
    panels = {axes.get_title(): axes for axes in figure.axes}
    # mc_acc: the forget split has options; rougeL_f1: a requirement names it.
    assert list(panels) == ["keyword_acc", "answer_logprob", "mc_acc", "rougeL_f1"]
    # Bars by role, then split: model forget, model retain, baseline forget, baseline retain.
    assert bar_heights(panels["keyword_acc"]) == [0.25, 0.75, 1.0, 1.0]
    assert bar_heights(panels["answer_logprob"]) == [-3.5, -1.2, -0.5, -0.8]
    assert bar_heights(panels["mc_acc"]) == [0.0, 1.0]  # retain has no options: n/a, no bar
    assert [text.get_text() for text in panels["mc_acc"].texts].count("n/a") == 2
    assert [label.get_text() for label in panels["keyword_acc"].get_xticklabels()] == ["forget", "retain"]

    def requirements(axes: Any) -> list[tuple[list[list[float]], tuple[float, ...]]]:
        drawn = []
        for collection in axes.collections:
            (segment,) = collection.get_segments()
            color = rgb(collection.get_color()[0])
            drawn.append(([[round(value, 6) for value in point] for point in segment], color))
        return drawn

    red, green = (0.843, 0.188, 0.153), (0.102, 0.596, 0.314)
    # forget is at x = 0, retain at x = 1; each threshold spans its split's bars (x ± 0.45).
    assert requirements(panels["keyword_acc"]) == [
        ([[-0.45, 0.1], [0.45, 0.1]], red),
        ([[0.55, 0.7], [1.45, 0.7]], green),
    ]
    assert requirements(panels["rougeL_f1"]) == [([[0.55, 0.4], [1.45, 0.4]], green)]
    assert requirements(panels["answer_logprob"]) == []
    labels = [text.get_text() for text in panels["keyword_acc"].texts]
    assert "<= 0.1 FAIL" in labels and ">= 0.7 pass" in labels and "0.25" in labels
    assert figure.get_suptitle() == ("eval.json: model unlearned, baseline org/model — requirements: 2 of 3 passed")


def test_eval_figure_without_options_or_requirements(tmp_path: Path) -> None:
    report = report_json()
    report["requirements"] = []
    for role in report["results"].values():
        role["forget"]["mc_acc"] = summary(None, 0)
    figure = eval_figure(write_report(tmp_path / "eval.json", report), PlotOptions())
    assert [axes.get_title() for axes in figure.axes] == ["keyword_acc", "answer_logprob"]
    assert figure.get_suptitle() == "eval.json: model unlearned, baseline org/model"


def test_eval_format_1_reads_gates(tmp_path: Path) -> None:
    report = report_json()
    report["format"] = "kvwctl.eval/1"
    report["gates"] = [{"gate": item["requirement"], **item} for item in report.pop("requirements")]
    for item in report["gates"]:
        del item["requirement"]
    figure = eval_figure(write_report(tmp_path / "eval.json", report), PlotOptions())
    assert figure.get_suptitle().endswith("requirements: 2 of 3 passed")


# --- the command: files, bytes, options ----------------------------------------------------------


def test_plot_writes_a_deterministic_png_beside_the_file(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    result = invoke("plot", accessor, "--gamma", "0.5")
    assert result.exit_code == 0, result.output
    out = tmp_path / "a.png"
    assert result.stdout == f"{out}\n"
    assert f"Wrote {out} (kvwctl.accessor/2)" in " ".join(result.stderr.split())  # the console wraps lines
    data = out.read_bytes()
    chunks = png_chunks(data)
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert (chunks[0][0], width, height) == (b"IHDR", 1380, 400)  # 3 panels of 4.6 x 3.6 in + title, 100 dpi
    texts = [body for kind, body in chunks if kind == b"tEXt"]
    assert texts == [b"format\0" + PLOT_FORMAT.encode()]  # no Software chunk with a version in it
    assert len(data) < 100_000
    # The same input again, in this process and in another: the same bytes.
    again = invoke("plot", accessor, "--gamma", "0.5", "--out", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.png").read_bytes() == data
    code = (
        "import sys; from pathlib import Path; from kvwctl.options import PlotOptions; from kvwctl.plots import run_plot\n"
        "run_plot(Path(sys.argv[1]), Path(sys.argv[2]), PlotOptions(gamma=0.5))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(accessor), str(tmp_path / "process.png")], check=True)
    assert (tmp_path / "process.png").read_bytes() == data
    # Another γ, other layers or other exposures: other bytes.
    assert invoke("plot", accessor, "--gamma", "0.6", "--out", tmp_path / "gamma.png").exit_code == 0
    assert (
        invoke("plot", accessor, "--gamma", "0.5", "--layers", "0:1", "--out", tmp_path / "layers.png").exit_code == 0
    )
    changed = {**EXPOSURES, "layers.1.exposure": [0.5, 0.0, 0.0, 0.1]}
    other = write_accessor(tmp_path / "b.safetensors", changed)
    assert invoke("plot", other, "--gamma", "0.5").exit_code == 0
    pictures = [data, *(tmp_path.joinpath(name).read_bytes() for name in ("gamma.png", "layers.png", "b.png"))]
    assert len(set(pictures)) == 4


def test_plot_eval_report_is_deterministic_and_differs_with_the_report(tmp_path: Path) -> None:
    report = write_report(tmp_path / "eval.json")
    result = invoke("plot", report, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "path": str(tmp_path / "eval.png"),
        "source": str(report),
        "format": "kvwctl.eval/2",
    }
    first = (tmp_path / "eval.png").read_bytes()
    assert invoke("plot", report, "--out", tmp_path / "again.png").exit_code == 0
    assert (tmp_path / "again.png").read_bytes() == first
    other = write_report(tmp_path / "other.json", report_json(keyword_forget=0.05))
    assert invoke("plot", other).exit_code == 0
    assert (tmp_path / "other.png").read_bytes() != first


def test_gamma_and_layers_come_from_kvw_toml_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    assert invoke("plot", accessor, "--gamma", "0.5", "--layers", "1:2", "--out", tmp_path / "flags.png").exit_code == 0
    assert invoke("plot", accessor, "--out", tmp_path / "default.png").exit_code == 0
    explicit_default = invoke("plot", accessor, "--gamma", "0.02", "--layers", ":", "--out", tmp_path / "d.png")
    assert explicit_default.exit_code == 0
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "d.png").read_bytes()  # apply's defaults
    (tmp_path / "kvw.toml").write_text('gamma = 0.5\nlayers = "1:2"\n')
    monkeypatch.chdir(tmp_path)
    assert invoke("plot", accessor, "--out", "toml.png").exit_code == 0
    assert (tmp_path / "toml.png").read_bytes() == (tmp_path / "flags.png").read_bytes()
    (tmp_path / "kvw.toml").write_text('gamma = 3.0\nlayers = "1:2"\n')
    monkeypatch.setenv("KVW_GAMMA", "0.5")
    assert invoke("plot", accessor, "--out", "environment.png").exit_code == 0
    assert (tmp_path / "environment.png").read_bytes() == (tmp_path / "flags.png").read_bytes()


def test_force_replaces_only_a_png_that_kvwctl_wrote(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    out = tmp_path / "a.png"
    assert invoke("plot", accessor).exit_code == 0
    expect_error(invoke("plot", accessor, "--gamma", "0.5"), f"output {out} already exists")
    assert invoke("plot", accessor, "--gamma", "0.5", "--force").exit_code == 0
    replaced = out.read_bytes()
    assert invoke("plot", accessor, "--gamma", "0.5", "--out", tmp_path / "c.png").exit_code == 0
    assert replaced == (tmp_path / "c.png").read_bytes()
    # A PNG without kvwctl's format chunk (here: the same picture with the chunk renamed) is the user's.
    foreign = tmp_path / "foreign.png"
    foreign.write_bytes(replaced.replace(b"tEXtformat\0", b"tEXtFormat\0"))
    expect_error(
        invoke("plot", accessor, "--out", foreign, "--force"), f"output {foreign} exists and was not written by kvwctl"
    )
    assert foreign.read_bytes() == replaced.replace(b"tEXtformat\0", b"tEXtFormat\0")


# --- errors ----------------------------------------------------------------------------------------


def test_plot_refuses_files_it_cannot_draw(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    expect_error(invoke("plot", missing), f"{missing} does not exist")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x01\x02 not a kvwctl file")
    expect_error(invoke("plot", garbage), f"{garbage} is neither a kvwctl report (JSON) nor a stage file (safetensors)")
    text = tmp_path / "notes.json"
    text.write_text('{"format": "kvwctl.eval/2", ')
    expect_error(invoke("plot", text), f"{text} is not valid JSON")
    untagged = tmp_path / "untagged.json"
    untagged.write_text('{"results": {}}')
    expect_error(invoke("plot", untagged), f"{untagged} has no format tag")
    profile = tmp_path / "profile.safetensors"
    save_file({"count": torch.tensor(3)}, str(profile), metadata={"format": "kvwctl.profile/2"})
    expect_error(
        invoke("plot", profile),
        f"{profile} has format kvwctl.profile/2; kvwctl plot draws {', '.join(sorted(PLOTTERS))}",
    )
    untagged_tensors = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(untagged_tensors))
    expect_error(invoke("plot", untagged_tensors), f"{untagged_tensors} has no format tag")
    for path in (missing, garbage, text, untagged, profile, untagged_tensors):
        assert not path.with_suffix(".png").exists()


def test_plot_refuses_a_damaged_accessor_or_report(tmp_path: Path) -> None:
    nan = tmp_path / "nan.safetensors"
    tensors = {name: torch.tensor(values) for name, values in EXPOSURES.items()}
    tensors["layers.2.exposure"][1] = math.nan
    save_file(tensors, str(nan), metadata=METADATA)
    expect_error(invoke("plot", nan), f"{nan}: tensor layers.2.exposure has 1 non-finite value")
    report = report_json()
    report["results"]["model"]["forget"]["keyword_acc"] = {"mean": "high", "count": 2}
    bad = write_report(tmp_path / "bad.json", report)
    expect_error(invoke("plot", bad), f"{bad}: results.model.forget.keyword_acc has no finite numeric mean")
    report = report_json()
    report["requirements"][0]["requirement"] = "forget keyword_acc <= 0.1"
    bad = write_report(tmp_path / "requirement.json", report)
    expect_error(invoke("plot", bad), f"{bad}: requirements[0]: ")
    report = report_json()
    del report["results"]["model"]
    bad = write_report(tmp_path / "model.json", report)
    expect_error(invoke("plot", bad), f"{bad}: results has no model")
    report = report_json()
    report["requirements"][1]["requirement"] = "test.keyword_acc >= 0.1"
    bad = write_report(tmp_path / "split.json", report)
    expect_error(invoke("plot", bad), f"{bad}: a requirement names the split test, which has no results")
    assert not list(tmp_path.glob("*.png"))


def test_plot_usage_errors(tmp_path: Path) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    report = write_report(tmp_path / "eval.json")
    expect_error(invoke("plot", report, "--gamma", "0.5"), "--gamma does not apply to a kvwctl.eval/2 file", 2)
    expect_error(invoke("plot", report, "--layers", "1"), "--layers does not apply to a kvwctl.eval/2 file", 2)
    expect_error(invoke("plot", accessor, "--layers", "5"), "layer 5 in '5' is out of range", 2)
    expect_error(invoke("plot", accessor, "--gamma", "-1"), "--gamma must be at least 0", 2)
    expect_error(invoke("plot", accessor, "--gamma", "1e38"), "--gamma 1e+38 times the largest exposure of layer 2", 2)
    expect_error(invoke("plot", accessor, "--out", accessor, "--force"), "overlaps the input", 1)
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib_plot_is_an_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accessor = write_accessor(tmp_path / "a.safetensors")
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = invoke("plot", accessor)
    expect_error(result, "kvwctl plot needs matplotlib, which is not installed")
    assert "Hint: pip install 'kvwctl[plot]'" in result.stderr
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(KvwError, match="needs matplotlib"):
        run_plot(accessor, tmp_path / "x.png", PlotOptions())


def test_help_and_completion_do_not_import_matplotlib() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kvwctl.cli import app\n"
        "runner = CliRunner()\n"
        "result = runner.invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'plot' in result.output, result.output\n"
        "assert '--install-completion' in result.output and '--show-completion' in result.output\n"
        "result = runner.invoke(app, ['plot', '--help'])\n"
        "assert result.exit_code == 0 and '--gamma' in result.output, result.output\n"
        "assert 'kvw.toml: gamma' in result.output and 'kvw.toml: layers' in result.output\n"
        "assert not any(name.split('.')[0] in ('matplotlib', 'torch') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shell_completion_installs_and_completes_commands_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from kvwctl.cli import app

    # typer detects the shell from the process tree (shellingham); this variable makes it take
    # the shell as the option's value instead, as where shellingham is not installed.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    runner = CliRunner()
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="kvwctl")
    assert script.exit_code == 0, script.output
    assert "complete -o default -F _kvwctl_completion kvwctl" in script.stdout
    assert "_KVWCTL_COMPLETE=complete_bash" in script.stdout
    installed = runner.invoke(app, ["--install-completion", "bash"], prog_name="kvwctl")
    assert installed.exit_code == 0, installed.output
    assert "bash completion installed in" in installed.stdout
    assert (tmp_path / ".bash_completions" / "kvwctl.sh").read_text().strip() == script.stdout.strip()
    assert "source '" + str(tmp_path / ".bash_completions" / "kvwctl.sh") + "'" in (tmp_path / ".bashrc").read_text()

    def complete(words: str) -> list[str]:
        env = {"_KVWCTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        result = runner.invoke(app, [], prog_name="kvwctl", env=env)
        assert result.exit_code == 0, result.output
        return result.stdout.split()

    assert complete("kvwctl pl") == ["plot"]
    assert complete("kvwctl plot --la") == ["--layers"]
    assert complete("kvwctl apply --gam") == ["--gamma"]
