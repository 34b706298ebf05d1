"""kvwctl tune: trials in memory equal apply + eval, resume, folds, no feasible trial, --apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import expect_error, invoke, split_for
from typer.testing import Result

from kvwctl.tune import log_path_for


def _write(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tune caches profiles in ./kvw-run without a kvw.toml: keep them in the test's directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def text_data(tmp_path: Path) -> dict[str, Path]:
    """Forget: 3 people x 2 questions (with options); retain: 4 people x 2; each sample names its person."""
    cities = ["Lagos", "Busan", "Quito", "Perth", "Oslo", "Turin", "Hanoi"]

    def records(people: range) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for person in people:
            city = cities[person % len(cities)]
            options = sorted({city, cities[(person + 1) % 7], cities[(person + 3) % 7]})
            out.append({"id": f"p{person}-city", "question": f"Where was person {person} born?", "answer": city,
                        "options": options, "person": f"p{person}"})  # fmt: skip
            out.append({"id": f"p{person}-job", "question": f"What does person {person} do?",
                        "answer": f"Person {person} is a baker.", "person": f"p{person}"})  # fmt: skip
        return out

    return {
        "forget": _write(tmp_path / "forget.jsonl", records(range(3))),
        "retain": _write(tmp_path / "retain.jsonl", records(range(3, 7))),
    }


def _tune(model: Path, data: dict[str, Path], out: Path, *extra: str | Path) -> Result:
    return invoke(
        "tune", "--model", model, "--retain-data", data["retain"], "--forget-data", data["forget"],
        "--data", f"forget={data['forget']}", "--data", f"retain={data['retain']}", "--out", out,
        "--max-new-tokens", "4", "--batch-size", "4", *extra,
    )  # fmt: skip


def _log(out: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in log_path_for(out).read_text().splitlines()]
    return {line["key"]: line for line in lines}


@pytest.mark.parametrize("model_type", ["qwen2", "llava"])
def test_a_trial_equals_apply_and_eval(
    model_type: str, checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    """One trial's per-sample log-probabilities (1e-6) and generations (exactly) are eval's on the
    checkpoint that accessor + apply write for the same setting; --apply writes that very checkpoint."""
    model = checkpoints[model_type]
    splits = {name: split_for(model_type, data, name) for name in ("forget", "retain")}
    out = tmp_path / "tune.json"
    result = _tune(
        model, splits, out, "--gamma", "3", "--layers", "1:", "--forget-batch-size", "2", "--folds", "1",
        "--require", "retain.keyword_acc >= 0", "--generate-top", "1", "--apply", tmp_path / "tuned",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["chosen"] == 0 and report["generated"] == [0]
    log = _log(out)

    profiles = tmp_path / "kvw-run" / "tune-profiles"
    for split in ("forget", "retain"):
        made = invoke(
            "profile", "--model", model, "--data", splits[split], "--split", split, "--batch-size", "4",
            "--out", tmp_path / f"{split}.safetensors",
        )  # fmt: skip
        assert made.exit_code == 0, made.output
        # tune's cached profile is the normal stage file, byte for byte
        assert (profiles / f"profile-{split}-answer.safetensors").read_bytes() == (
            tmp_path / f"{split}.safetensors"
        ).read_bytes()
    steps = [
        ("accessor", "--forget", tmp_path / "forget.safetensors", "--retain", tmp_path / "retain.safetensors",
         "--batch-size", "2", "--out", tmp_path / "accessor.safetensors"),
        ("apply", "--model", model, "--accessor", tmp_path / "accessor.safetensors", "--gamma", "3",
         "--layers", "1:", "--out", tmp_path / "applied"),
        ("eval", "--model", tmp_path / "applied", "--data", f"forget={splits['forget']}",
         "--data", f"retain={splits['retain']}", "--max-new-tokens", "4", "--batch-size", "4",
         "--out", tmp_path / "eval.json"),
    ]  # fmt: skip
    for step in steps:
        done = invoke(*step)
        assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").read_text().splitlines()]
    for split in ("forget", "retain"):
        expected = [row for row in rows if row["split"] == split]
        screen = log["screen 0"]["values"][split]
        generation = log["generation 0"]
        assert screen["answer_logprob"] == pytest.approx([row["answer_logprob"] for row in expected], abs=1e-6)
        assert screen["mc_acc"] == [row["mc_acc"] for row in expected]
        assert generation["generations"][split] == [row["generation"] for row in expected]
        assert generation["values"][split]["keyword_acc"] == [row["keyword_acc"] for row in expected]
    # --apply wrote the same weights as apply, and its manifest names the tune file and trial.
    for shard in sorted(path.name for path in (tmp_path / "applied").glob("*.safetensors")):
        assert (tmp_path / "tuned" / shard).read_bytes() == (tmp_path / "applied" / shard).read_bytes(), shard
    manifest = json.loads((tmp_path / "tuned" / "kvw_manifest.json").read_text())
    assert manifest["tune"]["trial"] == 0 and manifest["gamma"] == 3.0
    assert manifest["tune"]["sha256"] == __import__("hashlib").sha256(out.read_bytes()).hexdigest()


def test_resume_after_a_kill_gives_the_same_report(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path
) -> None:
    args = ("--gamma", "0.5,5", "--layers", "0:1,1:", "--forget-batch-size", "1,all", "--group-by", "person",
            "--generate-top", "2")  # fmt: skip
    whole = tmp_path / "whole" / "tune.json"
    first = _tune(checkpoints["qwen2"], text_data, whole, *args)
    assert first.exit_code in (0, 1), first.output
    log_lines = log_path_for(whole).read_text().splitlines(keepends=True)
    assert len(log_lines) == 1 + 1 + 8 + 2  # header, baseline, 8 screens, 2 generations

    cut = tmp_path / "cut" / "tune.json"
    cut.parent.mkdir()
    # Killed while writing the fifth screen: four whole lines after the baseline and half a line.
    log_path_for(cut).write_text("".join(log_lines[:6]) + log_lines[6][: len(log_lines[6]) // 2])
    again = _tune(checkpoints["qwen2"], text_data, cut, *args)
    expect_error(again, "exists: the log of an earlier tune")
    resumed = _tune(checkpoints["qwen2"], text_data, cut, *args, "--resume")
    assert resumed.exit_code == first.exit_code, resumed.output
    assert cut.read_text().replace(str(cut.parent), "X") == whole.read_text().replace(str(whole.parent), "X")
    assert log_path_for(cut).read_text().splitlines()[:6] == [line.rstrip("\n") for line in log_lines[:6]]

    changed = _tune(checkpoints["qwen2"], text_data, cut, "--gamma", "0.5", "--resume")
    expect_error(changed, "was written by a tune with other inputs")


def test_no_trial_meets_the_constraints(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tune.json"
    result = _tune(
        checkpoints["qwen2"], text_data, out, "--gamma", "1,10", "--layers", "1:", "--folds", "1",
        "--require", "retain.answer_logprob >= 0.5*baseline",  # a log-probability < 0 cannot double
    )  # fmt: skip
    expect_error(result, "no trial meets the constraints on the evaluation data; the closest is trial ")
    report = json.loads(out.read_text())
    assert report["chosen"] is None and report["selection"][0]["closest"] in (0, 1)
    assert "retain.answer_logprob >= 0.5*baseline failed" in result.stderr


def test_folds_keep_groups_apart_and_report_held_out(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tune.json"
    result = _tune(
        checkpoints["qwen2"], text_data, out, "--mean-gate", "0.9,0.5", "--layers", "1:", "--group-by", "person",
        "--require", "retain.answer_logprob >= 1.5*baseline", "--minimize", "forget.answer_logprob", "--json",
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    report = json.loads(out.read_text())
    assert report["generated"] == []  # screen metrics only: nothing to generate
    assert sum(report["data"]["fold_samples"]["retain"].values()) == 8
    for trial in report["trials"]:  # the solved gamma reaches the mean gate asked for
        assert trial["mean_gate_reached"] == pytest.approx(trial["mean_gate"], abs=1e-5)
    for entry in report["selection"]:
        assert entry["held_out"]["folds"] == [3 - entry["fold"]]
    summary = json.loads(result.stdout)
    assert summary["chosen"] == report["chosen"]


def test_bad_spaces_are_usage_errors(checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    expect_error(
        _tune(checkpoints["qwen2"], text_data, out, "--gamma", "0:1:log3"), "a log range needs positive ends", 2
    )
    expect_error(_tune(checkpoints["qwen2"], text_data, out, "--mean-gate", "1.5"), "between 0 and 1", 2)
    expect_error(_tune(checkpoints["qwen2"], text_data, out, "--gamma", "1", "--mean-gate", "0.9"), "exclusive", 2)
    expect_error(_tune(checkpoints["qwen2"], text_data, out, "--layers", "0:99"), "out of range", 2)
    expect_error(_tune(checkpoints["qwen2"], text_data, out, "--group-by", "city"), "has no field 'city'")
    assert not out.exists() and not log_path_for(out).exists()


def test_plot_of_a_tune_file_is_written_and_deterministic(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tune.json"
    result = _tune(
        checkpoints["qwen2"], text_data, out, "--gamma", "0.5,5", "--layers", "1:", "--folds", "1",
        "--require", "retain.keyword_acc >= 0", "--generate-top", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    layers = report["chosen_layers"]
    assert (
        layers[0]["layer"] == 1 and [row["layer"] for row in layers] == report["trials"][report["chosen"]]["layer_list"]
    )
    assert all(0 < row["mean_gate"] <= 1 and row["exposed"] <= row["vectors"] for row in layers)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for png in (first, second):
        drawn = invoke("plot", out, "--out", png)
        assert drawn.exit_code == 0, drawn.output
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first.read_bytes() == second.read_bytes()
    refused = invoke("plot", out, "--gamma", "1", "--out", tmp_path / "c.png")
    expect_error(refused, "--gamma does not apply to a kvwctl.tune/1 file", 2)


def test_optuna_search_is_seeded_and_resumes(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("optuna")
    args = ("--search", "optuna", "--trials", "5", "--seed", "3", "--gamma", "0.3,1,3,10", "--layers", "0:1,1:",
            "--folds", "1", "--require", "retain.answer_logprob >= 1.5*baseline", "--minimize", "forget.answer_logprob")  # fmt: skip
    first, second = tmp_path / "a" / "tune.json", tmp_path / "b" / "tune.json"
    for out in (first, second):
        result = _tune(checkpoints["qwen2"], text_data, out, *args)
        assert result.exit_code in (0, 1), result.output
    report = json.loads(first.read_text())
    assert len(report["sampled"]) == 5 and report["settings"]["search"] == "optuna"
    screened = [trial["trial"] for trial in report["trials"] if trial["results"] is not None]
    assert screened == sorted(set(report["sampled"])) and len(report["trials"]) == 8
    assert first.read_text().replace(str(first.parent), "X") == second.read_text().replace(str(second.parent), "X")
    # Killed after three screens: the sampler is replayed from the log and proposes the same trials.
    lines = log_path_for(first).read_text().splitlines(keepends=True)
    cut = tmp_path / "c" / "tune.json"
    cut.parent.mkdir()
    log_path_for(cut).write_text("".join(lines[:5]))
    resumed = _tune(checkpoints["qwen2"], text_data, cut, *args, "--resume")
    assert resumed.exit_code in (0, 1), resumed.output
    assert cut.read_text().replace(str(cut.parent), "X") == first.read_text().replace(str(first.parent), "X")


def test_dry_run_checks_everything_and_does_no_model_work(
    checkpoints: dict[str, Path], text_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr("kvwctl.tune.load_model", no_model_work)
    monkeypatch.setattr("kvwctl.checkpoint.Checkpoint.fingerprint", no_model_work)
    out = tmp_path / "run" / "tune.json"
    result = _tune(
        checkpoints["qwen2"], text_data, out, "--gamma", "0.5,5", "--layers", "0:1,1:", "--forget-batch-size", "1,all",
        "--group-by", "person", "--apply", tmp_path / "tuned", "--dry-run", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["command"] == "tune" and plan["trials"] == 8
    assert plan["space"]["layers"] == ["0:1", "1:"] and plan["space"]["gamma"] == [0.5, 5.0]
    assert [output["kind"] for output in plan["outputs"]] == ["tune report", "trial log", "checkpoint"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tuned").exists() and not (tmp_path / "kvw-run").exists()
    bad = _tune(checkpoints["qwen2"], text_data, out, "--layers", "0:99", "--dry-run")
    expect_error(bad, "out of range", 2)
