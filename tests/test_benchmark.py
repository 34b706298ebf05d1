"""benchmarks/run.py: the table's structure, ratios from the measured numbers, memory, bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402


def run_script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"PYTHONPATH": str(ROOT), "KVW_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_tiny_run_measures_rows_and_derives_ratios_from_them(tmp_path: Path) -> None:
    """Two profile rows and two apply rows at the tiniest size: the JSON, the markdown, the ratios."""
    out = tmp_path / "table.json"
    result = run_script(
        "--sizes", "tiny", "--rows", "profile,bare,apply,copy", "--out", out, "--workdir", tmp_path / "kept",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())

    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["cores"] >= 1 and machine["torch"].startswith("2.")
    assert machine["cpu"] and len(machine["load_average_before"]) == 3 and len(machine["load_average_after"]) == 3
    assert report["repeat"] == 1 and report["cpu_seconds"] > 0 and report["dtype"] == "float32"
    rows = report["rows"]
    assert [(row["stage"], row["id"]) for row in rows] == [
        ("profile", "profile"), ("profile", "bare"), ("apply", "apply"), ("apply", "copy"),
    ]  # fmt: skip
    for row in rows:
        assert row["size"] == "tiny" and row["seconds"] > 0 and row["work"] > 0 and row["peak_bytes"] >= 0
        assert row["repeats"] == 1
        assert row["throughput"] == pytest.approx(row["work"] / row["seconds"], rel=1e-12)
    profile, bare, apply, copy = rows
    assert profile["kvwctl"] and apply["kvwctl"] and not bare["kvwctl"] and not copy["kvwctl"]
    assert profile["unit"] == bare["unit"] == "tokens" and apply["unit"] == copy["unit"] == "MB"
    assert profile["work"] == bare["work"]  # the same batches, the same tokens
    checkpoint_mb = sum(path.stat().st_size for path in (tmp_path / "kept" / "tiny" / "checkpoint").iterdir()) / 1e6
    assert apply["work"] == copy["work"] == pytest.approx(checkpoint_mb, rel=1e-12)
    # The ratios are computed from the measured numbers, against the stage's kvwctl row.
    assert profile["kvwctl_speedup"] == 1.0 and apply["kvwctl_speedup"] == 1.0
    assert bare["kvwctl_speedup"] == pytest.approx(profile["throughput"] / bare["throughput"], rel=1e-12)
    assert copy["kvwctl_speedup"] == pytest.approx(apply["throughput"] / copy["throughput"], rel=1e-12)
    if profile["peak_bytes"] > 0:
        assert bare["memory_vs_kvwctl"] == pytest.approx(bare["peak_bytes"] / profile["peak_bytes"], rel=1e-12)
    targets = {target["target"]: target for target in report["targets"]}
    assert set(targets) == {"profile >= 0.9x bare", "apply >= 0.7x copy"}
    assert targets["apply >= 0.7x copy"]["speedup"] == copy["kvwctl_speedup"]
    assert targets["apply >= 0.7x copy"]["met"] == (copy["kvwctl_speedup"] >= 0.7)

    table = result.stdout  # the same table, as markdown, on stdout
    assert table.startswith("Machine: ") and f"torch {machine['torch']}" in table
    assert "| size | stage | row | seconds | throughput | peak MiB | kvwctl speed-up | memory vs kvwctl |" in table
    lines = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(lines) == 4
    assert f"| {bare['seconds']:.2f} |" in lines[1] and f"| {bare['kvwctl_speedup']:.2f}× |" in lines[1]
    assert "apply >= 0.7x copy" in table


def test_ratios_against_the_kvwctl_row_of_the_same_size_and_stage() -> None:
    def row(size: str, stage: str, kvwctl: bool, throughput: float, peak: int) -> dict[str, Any]:
        return {"size": size, "stage": stage, "kvwctl": kvwctl, "throughput": throughput, "peak_bytes": peak}

    rows = [
        row("a", "profile", True, 300.0, 100),
        row("a", "profile", False, 100.0, 1400),
        row("b", "profile", True, 30.0, 0),
        row("b", "profile", False, 60.0, 50),
        row("a", "eval", False, 5.0, 10),  # its stage's kvwctl row was not run
    ]
    bench.ratios(rows)
    assert [item["kvwctl_speedup"] for item in rows] == [1.0, 3.0, 1.0, 0.5, None]
    assert [item["memory_vs_kvwctl"] for item in rows] == [1.0, 14.0, None, None, None]


def test_peak_memory_counts_what_the_work_allocates() -> None:
    held = bytearray(64 * 2**20)  # allocated before: not counted
    with bench.PeakMemory("cpu") as memory:
        block = bytearray(256 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        del block
    assert 200 * 2**20 < memory.peak() < 400 * 2**20
    del held


def test_a_failing_row_is_reported_with_its_traceback() -> None:
    def broken() -> None:
        raise ValueError("row exploded")

    with pytest.raises(RuntimeError, match="ValueError: row exploded"):
        bench.in_child(broken)
    assert bench.in_child(lambda: {"answer": 42}) == {"answer": 42}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "profile,nonsense"], "unknown rows: nonsense"),
        (["--out", "table.csv"], "--out must end in .json or .md"),
        (["--sizes", "huge"], "invalid choice: 'huge'"),
        (["--workdir", "."], "--workdir . exists; name a new directory"),
        (["--repeat", "0"], "--repeat must be at least 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_reference_style_loop_computes_what_kvwctl_profile_does(tmp_path: Path) -> None:
    """The rows compare the same computation: the authors'-style sums equal collect_sums' pooled ones."""
    import torch
    from rows import reference_sums
    from sizes import SIZES, write_data

    from kvwctl.checkpoint import open_checkpoint
    from kvwctl.data import load_samples
    from kvwctl.modeling import load_model, render_all
    from kvwctl.profile import collect_sums
    from kvwctl.progress import NullTracker
    from kvwctl.source import resolve_model
    from kvwctl.testing import build_checkpoint

    checkpoint = build_checkpoint("llama", tmp_path / "llama")
    loaded = load_model(
        open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32
    )
    data = write_data(SIZES["tiny"], tmp_path / "data")
    rendered = render_all(loaded.renderer, load_samples(data["retain"]))
    rows = collect_sums(loaded, rendered, positions="answer", batch_size=3, tracker=NullTracker(), description="test")
    for layer, layer_sums in enumerate(reference_sums(loaded, rendered)):
        expected = rows[f"layers.{layer}.sum"].sum(dim=0)
        torch.testing.assert_close(torch.from_numpy(layer_sums), expected, rtol=1e-5, atol=1e-6)
