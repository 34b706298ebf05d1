"""An output never lands on an input, and --force replaces only what kvwctl wrote (issue 9, class 3)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import expect_error, invoke

from kvwctl.errors import KvwError
from kvwctl.files import staged_output_dir
from kvwctl.outputs import check_outputs

MODEL = "qwen2"


def tree_digest(path: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file (links as links), to prove nothing changed."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


@pytest.fixture(scope="module")
def stage_files(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A private copy of the model, its retain/forget profiles and an accessor."""
    root = tmp_path_factory.mktemp("outputs")
    model = root / "model"
    shutil.copytree(checkpoints[MODEL], model)
    paths = {"model": model}
    for split in ("retain", "forget"):
        out = root / f"{split}.safetensors"
        result = invoke("profile", "--model", model, "--data", data[f"{split}-text"], "--split", split, "--out", out)
        assert result.exit_code == 0, result.output
        paths[split] = out
    paths["accessor"] = root / "accessor.safetensors"
    result = invoke("accessor", "--forget", paths["forget"], "--retain", paths["retain"], "--out", paths["accessor"])
    assert result.exit_code == 0, result.output
    return paths


def test_progressive_exposure_out_into_the_input_model_is_refused(
    stage_files: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = stage_files["model"]
    before = tree_digest(model)
    shard = sorted(model.glob("*.safetensors"))[0]
    base: list[str | Path] = ["apply", "--model", model, "--progressive", "--forget-data", data["forget-text"]]
    base += ["--retain", stage_files["retain"], "--out", tmp_path / "o"]
    expect_error(invoke(*base, "--exposure-out", model / "exposure.safetensors"), "overlaps the input")
    result = invoke(*base, "--exposure-out", shard, "--force")
    expect_error(result, f"output {shard} overlaps the input {shard} (the same file)")
    assert tree_digest(model) == before
    assert not (tmp_path / "o").exists()


def test_progressive_exposure_out_inside_the_output_checkpoint_is_refused(
    stage_files: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke(
        "apply", "--model", stage_files["model"], "--progressive", "--forget-data", data["forget-text"],
        "--retain", stage_files["retain"], "--out", tmp_path / "o", "--exposure-out", tmp_path / "o" / "e.safetensors",
    )  # fmt: skip
    expect_error(result, "overlaps the output")
    assert list(tmp_path.iterdir()) == []


def test_profile_out_equal_to_its_data_is_refused_even_with_force(
    stage_files: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    samples = tmp_path / "retain.jsonl"
    shutil.copyfile(data["retain-text"], samples)
    before = samples.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(samples)
    for out in (samples, link):
        result = invoke(
            "profile", "--model", stage_files["model"], "--data", samples, "--split", "retain", "--out", out, "--force"
        )
        expect_error(result, "overlaps the input")
        expect_error(result, "(the same file)")
    assert samples.read_bytes() == before


def test_profile_out_inside_the_model_is_refused(stage_files: dict[str, Path], data: dict[str, Path]) -> None:
    model = stage_files["model"]
    before = tree_digest(model)
    result = invoke("profile", "--model", model, "--data", data["retain-text"], "--split", "retain",
                    "--out", model / "config.json", "--force")  # fmt: skip
    expect_error(result, f"overlaps the input {model}")
    assert tree_digest(model) == before


def test_accessor_out_equal_to_one_of_its_profiles_is_refused(stage_files: dict[str, Path], tmp_path: Path) -> None:
    forget, retain = tmp_path / "f.safetensors", tmp_path / "r.safetensors"
    shutil.copyfile(stage_files["forget"], forget)
    shutil.copyfile(stage_files["retain"], retain)
    for out in (forget, retain):
        before = out.read_bytes()
        result = invoke("accessor", "--forget", forget, "--retain", retain, "--out", out, "--force")
        expect_error(result, f"output {out} overlaps the input {out} (the same file)")
        assert out.read_bytes() == before


def test_apply_force_onto_a_directory_holding_its_accessor_is_refused(
    stage_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "unlearned"
    args: list[str | Path] = ["apply", "--model", stage_files["model"], "--gamma", "0.02", "--out", out]
    assert invoke(*args, "--accessor", stage_files["accessor"]).exit_code == 0  # a kvwctl checkpoint
    accessor = out / "accessor.safetensors"
    shutil.copyfile(stage_files["accessor"], accessor)
    result = invoke(*args, "--accessor", accessor, "--force")
    expect_error(result, f"output {out} overlaps the input {accessor} (it contains it)")
    assert accessor.read_bytes() == stage_files["accessor"].read_bytes()


def test_force_refuses_a_directory_kvwctl_did_not_write(stage_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "my-folder"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = invoke(
        "apply", "--model", stage_files["model"], "--accessor", stage_files["accessor"], "--out", out, "--force"
    )
    expect_error(result, f"output {out} exists and was not written by kvwctl (the directory has no kvw_manifest.json)")
    assert "remove it yourself if it may go, or choose another output path" in result.stderr
    assert (out / "thesis.tex").read_text() == "years of work"
    # A manifest that another tool wrote does not count either.
    (out / "kvw_manifest.json").write_text('{"tool": "something-else"}')
    expect_error(
        invoke(
            "apply", "--model", stage_files["model"], "--accessor", stage_files["accessor"], "--out", out, "--force"
        ),
        "was not written by kvwctl",
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my-folder"]


def test_force_replaces_kvwctl_outputs_and_empty_ones(stage_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    args: list[str | Path] = [
        "apply",
        "--model",
        stage_files["model"],
        "--accessor",
        stage_files["accessor"],
        "--out",
        out,
        "--force",
    ]
    assert invoke(*args).exit_code == 0
    assert invoke(*args).exit_code == 0  # its own checkpoint, replaced
    accessor = tmp_path / "a.safetensors"
    accessor.write_bytes(b"")
    accessor_args: list[str | Path] = [
        "accessor",
        "--forget",
        stage_files["forget"],
        "--retain",
        stage_files["retain"],
        "--out",
        accessor,
    ]
    assert invoke(*accessor_args, "--force").exit_code == 0  # an empty file
    assert invoke(*accessor_args, "--force").exit_code == 0  # a kvwctl stage file


def test_force_refuses_a_file_kvwctl_did_not_write(
    stage_files: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    result = invoke(
        "accessor", "--forget", stage_files["forget"], "--retain", stage_files["retain"], "--out", out, "--force"
    )
    expect_error(result, f"output {out} exists and was not written by kvwctl (the file has no kvwctl format tag)")
    foreign = tmp_path / "foreign.safetensors"  # a safetensors file of someone else's
    shutil.copyfile(sorted(stage_files["model"].glob("*.safetensors"))[0], foreign)
    result = invoke(
        "accessor", "--forget", stage_files["forget"], "--retain", stage_files["retain"], "--out", foreign, "--force"
    )
    expect_error(result, "was not written by kvwctl")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"format": "other/1"}))
    result = invoke(
        "eval", "--model", stage_files["model"], "--data", f"qa={data['retain-text']}", "--out", report, "--force"
    )
    expect_error(result, "was not written by kvwctl")
    assert out.read_text() == "my notes" and json.loads(report.read_text()) == {"format": "other/1"}


def test_eval_outputs_are_checked_against_its_inputs(
    stage_files: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    split = tmp_path / "qa.jsonl"
    shutil.copyfile(data["retain-text"], split)
    before = split.read_bytes()
    common: list[str | Path] = ["eval", "--model", stage_files["model"], "--data", f"qa={split}", "--force"]
    expect_error(invoke(*common, "--out", split), f"output {split} overlaps the input {split} (the same file)")
    expect_error(invoke(*common, "--out", tmp_path / "r.json", "--samples-out", split), "overlaps the input")
    model = stage_files["model"]
    expect_error(invoke(*common, "--out", model / "eval.json"), f"overlaps the input {model} (inside it)")
    assert split.read_bytes() == before and not (model / "eval.json").exists()


def test_check_outputs_compares_every_output_with_every_input(tmp_path: Path) -> None:
    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    model.mkdir()
    data.write_text("{}\n")
    hardlink = tmp_path / "hard.jsonl"
    hardlink.hardlink_to(data)
    with pytest.raises(KvwError, match=r"overlaps the input .* \(the same file\)"):
        check_outputs(files=[hardlink], inputs=[model, data], force=True)
    (tmp_path / "parent-link").symlink_to(model)
    with pytest.raises(KvwError, match=r"\(inside it\)"):
        check_outputs(files=[tmp_path / "parent-link" / "x.safetensors"], inputs=[model, data], force=True)
    with pytest.raises(KvwError, match=r"overlaps the output"):
        check_outputs(files=[tmp_path / "a"], directories=[tmp_path / "a"], inputs=[], force=True)
    check_outputs(files=[tmp_path / "x"], directories=[tmp_path / "y"], inputs=[model, data], force=False)


def test_staged_output_dir_checks_again_before_deleting(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KvwError, match="was not written by kvwctl"), staged_output_dir(out, force=True) as staging:
        (staging / "weights").write_text("new")
        out.mkdir()  # a user's folder appeared while kvwctl worked
        (out / "mine.txt").write_text("mine")
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
