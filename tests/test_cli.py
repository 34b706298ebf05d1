"""The command line: both configuration forms, stdout/stderr conventions, every error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_checkpoint, expect_error, invoke
from typer.testing import CliRunner

from kvwctl.architectures import REGISTRY
from kvwctl.cli import app
from kvwctl.options import ApplyOptions
from kvwctl.source import ModelSpec

runner = CliRunner()


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_help_lists_commands_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kvwctl.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert all(name in result.output for name in ('profile', 'accessor', 'apply'))\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_shows_the_defaults_written_in_brackets() -> None:
    # Rich markup would swallow "[default: …]" as a tag; the help must show it verbatim.
    result = runner.invoke(app, ["accessor", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # undo the line wrapping
    assert "[default: 1, as the paper; kvw.toml: forget_batch_size]" in text
    assert "[default: <workdir>/accessor.safetensors]" in text


def test_pipeline_from_kvw_toml(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kvw.toml").write_text(
        f'model = "{checkpoints["llava"]}"\nworkdir = "run"\n\n[splits]\n'
        f'forget = "{data["forget"]}"\nretain = "{data["retain"]}"\n'
    )
    monkeypatch.chdir(tmp_path)
    retain = invoke("profile", "--split", "retain")
    assert retain.exit_code == 0, retain.output
    assert retain.stdout.strip() == str(tmp_path / "run/profile-retain.safetensors")  # stdout: only the result
    assert "model" in retain.stderr and str(data["retain"]) in retain.stderr  # resolved inputs on stderr
    assert invoke("profile", "--split", "forget").exit_code == 0
    accessor = invoke("accessor")
    assert accessor.exit_code == 0, accessor.output
    assert accessor.stdout.strip() == str(tmp_path / "run/accessor.safetensors")
    assert "A > 0" in accessor.stderr
    applied = invoke("apply", "--gamma", "0.02", "--layers", "1:2", "--json")
    assert applied.exit_code == 0, applied.output
    summary = json.loads(applied.stdout)
    assert summary["path"] == str(tmp_path / "run/unlearned")
    assert summary["manifest"]["layers"] == [1, 2]
    assert "Layers edited: [1, 2]" in applied.stderr
    assert (tmp_path / "run" / "unlearned" / "kvw_manifest.json").is_file()


def test_pipeline_from_flags(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    model = checkpoints["qwen2_vl"]
    r, f, a = tmp_path / "r.safetensors", tmp_path / "f.safetensors", tmp_path / "a.safetensors"
    assert invoke("profile", "--model", model, "--data", data["retain"], "--split", "retain", "--out", r).exit_code == 0
    assert (
        invoke("profile", "--model", model, "--data", data["forget"], "--split", "forget", "--out", f, "--quiet").stderr
        == ""
    )
    assert invoke("accessor", "--forget", f, "--retain", r, "--out", a, "--batch-size", "2").exit_code == 0
    one_shot = invoke(
        "apply", "--model", model, "--accessor", a, "--gamma", "0.02", "--layers", ":2", "--out", tmp_path / "o"
    )
    assert one_shot.exit_code == 0, one_shot.output
    assert one_shot.stdout.strip() == str(tmp_path / "o")
    progressive = invoke(
        "apply",
        "--model",
        model,
        "--progressive",
        "--forget-data",
        data["forget"],
        "--retain",
        r,
        "--gamma",
        "0.02",
        "--layers",
        "2:",
        "--out",
        tmp_path / "p",
    )
    assert progressive.exit_code == 0, progressive.output
    assert "Layers edited: [2, 3]" in progressive.stderr
    assert (tmp_path / "p.exposure.safetensors").is_file()


def test_missing_model_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expect_error(invoke("profile", "--split", "retain"), "missing --model", exit_code=2)


def test_unknown_config_key(tmp_path: Path) -> None:
    (tmp_path / "kvw.toml").write_text('modle = "x"\n')
    expect_error(invoke("accessor", "--config", tmp_path / "kvw.toml"), "unknown key 'modle'")


def test_unknown_model_type_lists_supported(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_checkpoint(checkpoints["qwen2"], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = invoke(
        "profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", tmp_path / "r"
    )
    expect_error(result, "unsupported model_type 'bert'")
    supported = ", ".join(sorted(REGISTRY))
    assert supported in " ".join(result.stderr.split())


def test_bad_data_names_file_and_line(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A"}\n{"question": "", "answer": "A"}\nnot json\n')
    result = invoke(
        "profile", "--model", checkpoints["qwen2"], "--data", bad, "--split", "retain", "--out", tmp_path / "r"
    )
    expect_error(result, f"{bad}:2: question: required")
    assert f"{bad}:3: invalid JSON" in result.stderr


def test_missing_and_unreadable_images_are_reported_before_model_work(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        '{"image": "missing.png", "question": "Who?", "answer": "A"}\n'
        '{"image": ["broken.png"], "question": "Who?", "answer": "B"}\n'
    )
    result = invoke(
        "profile", "--model", checkpoints["llava"], "--data", samples, "--split", "forget", "--out", tmp_path / "f"
    )
    expect_error(result, f"{samples}:1: image: {tmp_path / 'missing.png'} does not exist")
    assert f"{samples}:2: image: {tmp_path / 'broken.png'} is not a readable image" in result.stderr


def test_unlocatable_answer_names_the_sample(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = copy_checkpoint(checkpoints["qwen2"], tmp_path / "m")
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        template.replace("{{ message['content'] }}", "{{ message['content'] | upper }}")
    )
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "upper-1", "question": "Who?", "answer": "Mira Okafor"}\n')
    result = invoke("profile", "--model", model, "--data", samples, "--split", "forget", "--out", tmp_path / "f")
    expect_error(result, "cannot locate the answer of sample 'upper-1'")


def test_images_for_a_text_only_model(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "profile",
        "--model",
        checkpoints["qwen2"],
        "--data",
        data["forget"],
        "--split",
        "forget",
        "--out",
        tmp_path / "f",
    )
    expect_error(result, "the model is text-only and cannot take images")


def test_invalid_options(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    base: list[str | Path] = [
        "profile", "--model", checkpoints["qwen2"], "--data", data["retain-text"], "--out", tmp_path / "r"
    ]  # fmt: skip
    expect_error(
        invoke(*base, "--split", "retain", "--positions", "every"),
        "--positions must be one of answer, answer-tokens, all, got 'every'",
        exit_code=2,
    )
    expect_error(invoke(*base, "--split", "test"), "--split must be one of retain, forget, got 'test'", exit_code=2)


@pytest.mark.skipif(torch_cuda_available(), reason="asserts that CUDA is not available")
def test_cuda_device_without_cuda(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    base: list[str | Path] = [
        "profile", "--model", checkpoints["qwen2"], "--data", data["retain-text"], "--out", tmp_path / "r"
    ]  # fmt: skip
    expect_error(invoke(*base, "--split", "retain", "--device", "cuda:0"), "CUDA is not available")


@pytest.fixture(scope="module")
def profiles(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-profiles")
    paths = {}
    for model_type in ("qwen2", "llama"):
        for split in ("retain", "forget"):
            out = root / f"{model_type}-{split}.safetensors"
            result = invoke(
                "profile",
                "--model",
                checkpoints[model_type],
                "--data",
                data[f"{split}-text"],
                "--split",
                split,
                "--out",
                out,
            )
            assert result.exit_code == 0, result.output
            paths[f"{model_type}-{split}"] = out
    accessor = root / "qwen2-accessor.safetensors"
    assert (
        invoke(
            "accessor", "--forget", paths["qwen2-forget"], "--retain", paths["qwen2-retain"], "--out", accessor
        ).exit_code
        == 0
    )
    paths["qwen2-accessor"] = accessor
    return paths


def test_accessor_refuses_profiles_of_different_models(profiles: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "accessor", "--forget", profiles["qwen2-forget"], "--retain", profiles["llama-retain"], "--out", tmp_path / "a"
    )
    expect_error(result, "were made from different models")


def test_accessor_refuses_wrong_formats_and_splits(profiles: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "accessor",
        "--forget",
        profiles["qwen2-accessor"],
        "--retain",
        profiles["qwen2-retain"],
        "--out",
        tmp_path / "a",
    )
    expect_error(result, "has format kvwctl.accessor/2; expected kvwctl.profile/2")
    swapped = invoke(
        "accessor", "--forget", profiles["qwen2-retain"], "--retain", profiles["qwen2-forget"], "--out", tmp_path / "a"
    )
    expect_error(swapped, "is a retain profile; expected a forget profile")
    expect_error(
        invoke("accessor", "--forget", tmp_path / "none", "--retain", profiles["qwen2-retain"]), "does not exist"
    )


def test_apply_errors(checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path) -> None:
    accessor = profiles["qwen2-accessor"]
    expect_error(
        invoke("apply", "--model", checkpoints["llama"], "--accessor", accessor, "--out", tmp_path / "o"),
        "was made from",
    )
    expect_error(
        invoke(
            "apply",
            "--model",
            checkpoints["qwen2"],
            "--accessor",
            accessor,
            "--layers",
            "2:26",
            "--out",
            tmp_path / "o",
        ),
        "layer 4 in '2:26' is out of range",
        exit_code=2,
    )
    expect_error(
        invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", checkpoints["qwen2"] / "sub"),
        "overlaps the input",
    )
    expect_error(
        invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--gamma", "-1"),
        "--gamma must be at least 0, got -1.0",
        exit_code=2,
    )
    usage = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--retain", accessor)
    assert usage.exit_code == 2 and "--retain applies to --progressive only" in usage.output


def test_apply_refuses_existing_output_and_replaces_it_with_force(
    checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "kvw_manifest.json").write_text('{"tool": "kvwctl"}')  # --force replaces only kvwctl's outputs
    args: list[str | Path] = [
        "apply", "--model", checkpoints["qwen2"], "--accessor", profiles["qwen2-accessor"], "--out", out
    ]  # fmt: skip
    expect_error(invoke(*args), "already exists")
    assert (out / "old.txt").is_file()
    assert invoke(*args, "--force").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "kvw_manifest.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["o"]  # no staging directories left behind


def test_failed_apply_leaves_nothing_half_written(
    checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.apply
    from kvwctl.checkpoint import ShardCopy, copy_patched_shard

    calls: list[Path] = []

    def failing_copy(source: Path, target: Path, patches: dict[tuple[int, int], bytes]) -> ShardCopy:
        calls.append(source)
        if len(calls) == 3:
            raise OSError("disk full")
        return copy_patched_shard(source, target, patches)

    monkeypatch.setattr(kvwctl.apply, "copy_patched_shard", failing_copy)
    from kvwctl.errors import KvwError

    with pytest.raises(KvwError, match="disk full"):  # an OSError while writing is a user error
        kvwctl.apply.run_apply(
            ModelSpec(str(checkpoints["qwen2"])),
            profiles["qwen2-accessor"],
            tmp_path / "o",
            ApplyOptions(gamma=1.0, layers=":"),
        )
    assert list(tmp_path.iterdir()) == []


def test_interrupt_exits_130(
    checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.accessor

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kvwctl.accessor, "execute_accessor", interrupted)
    result = invoke(
        "accessor", "--forget", profiles["qwen2-forget"], "--retain", profiles["qwen2-retain"], "--out", tmp_path / "a"
    )
    assert result.exit_code == 130


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = invoke("accessor", "--forget", tmp_path / "none", "--retain", tmp_path / "none2", "--debug")
    assert result.exit_code == 1
    assert result.exception is not None and "does not exist" in str(result.exception)


def test_entry_point_exit_codes(tmp_path: Path) -> None:
    """The installed console script, as a shell pipeline sees it."""
    env = {**os.environ, "NO_COLOR": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "kvwctl", "accessor", "--forget", str(tmp_path / "x"), "--retain", str(tmp_path / "y")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert f"Error: {tmp_path / 'x'} does not exist" in completed.stderr.splitlines()
    usage = subprocess.run([sys.executable, "-m", "kvwctl", "apply", "--gamma", "x"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_accessor_refuses_profiles_of_different_positions(
    checkpoints: dict[str, Path], data: dict[str, Path], profiles: dict[str, Path], tmp_path: Path
) -> None:
    all_positions = tmp_path / "f-all.safetensors"
    made = invoke(
        "profile", "--model", checkpoints["qwen2"], "--data", data["forget-text"], "--split", "forget",
        "--positions", "all", "--out", all_positions,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    result = invoke(
        "accessor", "--forget", all_positions, "--retain", profiles["qwen2-retain"], "--out", tmp_path / "a"
    )
    expect_error(result, "profiles positions 'all' but")


def test_revision_is_refused_for_a_local_directory(
    checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke(
        "apply", "--model", checkpoints["qwen2"], "--revision", "v1", "--accessor", profiles["qwen2-accessor"],
        "--out", tmp_path / "o",
    )  # fmt: skip
    expect_error(result, "is a local directory", exit_code=2)


def test_progressive_refuses_a_forget_profile_as_retain(
    checkpoints: dict[str, Path], data: dict[str, Path], profiles: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke(
        "apply", "--model", checkpoints["qwen2"], "--progressive", "--forget-data", data["forget-text"],
        "--retain", profiles["qwen2-forget"], "--out", tmp_path / "o",
    )  # fmt: skip
    expect_error(result, "is a forget profile; expected a retain profile")
    assert not (tmp_path / "o").exists()


# --- the one rule for exit codes, and plain-text messages ---------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["apply", "--gamma", "-1"], "--gamma must be at least 0, got -1.0"),
        (["apply", "--gamma", "inf"], "--gamma must be a finite number, got inf"),
        (["apply", "--layers", "3:1"], "--layers invalid layer range '3:1': start 3 is after end 1"),
        (["profile", "--split", "forgett"], "--split must be one of retain, forget, got 'forgett'"),
        (["accessor", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["eval", "--model", "m", "--data", "a=b", "--require", "forget.x <= 1"], "unknown metric 'x'"),
        (["apply", "--progressive", "--accessor", "a"], "--accessor does not apply with --progressive"),
    ],
)
def test_bad_option_values_exit_2_through_the_catch_site(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    expect_error(invoke(*args), message, exit_code=2)


def test_malformed_option_type_exits_2() -> None:
    assert invoke("apply", "--gamma", "abc").exit_code == 2


def test_bad_option_from_the_environment_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVW_FORGET_BATCH_SIZE", "0")
    expect_error(invoke("accessor"), "KVW_FORGET_BATCH_SIZE must be at least 1, got 0", exit_code=2)


def test_bad_kvw_toml_value_exits_1_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "kvw.toml").write_text("gamma = -1\n")
    result = invoke("apply", "--config", tmp_path / "kvw.toml")
    expect_error(result, f"{tmp_path / 'kvw.toml'}: gamma must be at least 0, got -1")


def test_error_messages_are_plain_text_not_markup(tmp_path: Path) -> None:
    # Rich markup would swallow "[splits]" and crash on "[/]".
    (tmp_path / "kvw.toml").write_text('splits = "x"\n')
    result = invoke("accessor", "--config", tmp_path / "kvw.toml")
    expect_error(result, "[splits] must be a table of name = path, got 'x'")
    odd = tmp_path / "a[/]b[bold]"
    result = invoke("accessor", "--forget", odd, "--retain", odd)
    expect_error(result, f"Error: {odd} does not exist")


def test_interrupt_wrapped_in_another_exception_exits_130(
    checkpoints: dict[str, Path], profiles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.accessor

    def interrupted_inside_a_library(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("read interrupted") from None  # the interrupt stays in __context__

    monkeypatch.setattr(kvwctl.accessor, "execute_accessor", interrupted_inside_a_library)
    result = invoke(
        "accessor", "--forget", profiles["qwen2-forget"], "--retain", profiles["qwen2-retain"], "--out", tmp_path / "a"
    )
    assert result.exit_code == 130
    assert "Interrupted." in result.stderr


def test_missing_local_model_directory_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kvw-run").mkdir()
    (tmp_path / "d.jsonl").write_text('{"question": "Q?", "answer": "A"}\n')
    for reference in ("kvw-run/unlearned", "./nothing", str(tmp_path / "nothing")):
        result = invoke("profile", "--split", "retain", "--model", reference, "--data", tmp_path / "d.jsonl")
        expect_error(result, f"model directory {reference} does not exist")


def test_version_flag_and_command_print_the_one_version() -> None:
    from importlib.metadata import version

    import kvwctl

    assert kvwctl.__version__ == version("kvwctl")
    for args in (["--version"], ["version"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stdout == f"{kvwctl.__version__}\n"
