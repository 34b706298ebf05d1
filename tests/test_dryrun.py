"""``--dry-run``: every command resolves and checks its inputs, prints the plan and does no model work."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import invoke


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots``, with its size and mtime (hidden entries too)."""
    found: dict[str, tuple[int, int]] = {}
    for root in roots:
        for directory, subdirectories, files in os.walk(root):
            for name in [*subdirectories, *files]:
                path = Path(directory) / name
                status = path.lstat()
                found[str(path)] = (status.st_size, status.st_mtime_ns)
    return found


@pytest.fixture
def unlearned(checkpoints: dict[str, Path], accessor: Path, tmp_path: Path) -> Path:
    """A real one-shot output of the tiny qwen2 checkpoint, made before any patching."""
    out = tmp_path / "made" / "unlearned"
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--layers", "1:2", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def no_model_work(
    monkeypatch: pytest.MonkeyPatch, checkpoints: dict[str, Path], unlearned: Path
) -> Iterator[list[str]]:
    """Every way a command loads a model or reads weights raises; the list names what was attempted."""
    import safetensors
    import transformers

    import kvwctl.apply
    import kvwctl.checkpoint
    import kvwctl.evaluate
    import kvwctl.modeling
    import kvwctl.profile
    import kvwctl.verify

    attempted: list[str] = []

    def forbidden(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            attempted.append(name)
            raise AssertionError(f"model work in a dry run: {name}")

        return refuse

    for module in (kvwctl.modeling, kvwctl.profile, kvwctl.evaluate):
        monkeypatch.setattr(module, "load_model", forbidden("load_model"))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden("from_pretrained")))
    for auto in ("AutoTokenizer", "AutoProcessor"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", forbidden(f"{auto}.from_pretrained"))
    monkeypatch.setattr(kvwctl.checkpoint.Checkpoint, "fingerprint", forbidden("fingerprint"))
    monkeypatch.setattr(kvwctl.checkpoint.Checkpoint, "tensor_digests", forbidden("tensor_digests"))
    monkeypatch.setattr(kvwctl.apply, "copy_patched_shard", forbidden("copy_patched_shard"))
    monkeypatch.setattr(kvwctl.verify, "file_sha256", forbidden("verify file_sha256"))
    weights = [checkpoints["qwen2"].resolve(), unlearned.resolve()]
    real_safe_open = safetensors.safe_open

    def safe_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved = Path(path).resolve()
        if any(root in resolved.parents for root in weights):
            attempted.append(f"safe_open {resolved.name}")
            raise AssertionError(f"weights read in a dry run: {resolved}")
        return real_safe_open(path, *args, **kwargs)  # stage files (small) are read and checked

    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    yield attempted
    assert attempted == []


def dry(*args: str | Path) -> dict[str, Any]:
    """Run ``kvwctl ARGS --dry-run --json``: exit 0, the plan on stdout, the table on stderr."""
    result = invoke(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert "Dry run: nothing was loaded or written." in result.stderr
    assert f"dry run: {args[0]}" in result.stderr
    plan: dict[str, Any] = json.loads(result.stdout)
    assert plan["dry_run"] is True
    return plan


def test_every_command_plans_without_model_work(
    checkpoints: dict[str, Path],
    data: dict[str, Path],
    accessor: Path,
    unlearned: Path,
    tmp_path: Path,
    no_model_work: list[str],
) -> None:
    model = checkpoints["qwen2"]
    config = json.loads((model / "config.json").read_text())
    shards = {path.name: path.stat().st_size for path in sorted(model.glob("*.safetensors"))}
    assert len(shards) > 1  # the tiny checkpoints are sharded
    forget_profile, retain_profile = accessor.parent / "forget.safetensors", accessor.parent / "retain.safetensors"
    target = tmp_path / "new"
    before = snapshot(tmp_path, accessor.parent, model)

    profile = dry(
        "profile", "--model", model, "--data", data["forget-text"], "--split", "forget",
        "--batch-size", "2", "--out", target / "p.safetensors",
    )  # fmt: skip
    assert profile["command"] == "profile"
    assert profile["model"]["num_layers"] == config["num_hidden_layers"]
    assert profile["model"]["model_type"] == "qwen2" and profile["model"]["revision"] is None
    assert profile["model"]["shards"] == shards and profile["model"]["shard_bytes"] == sum(shards.values())
    assert profile["model"]["vectors_per_layer"] == [config["intermediate_size"]]
    assert profile["layers"] == list(range(config["num_hidden_layers"]))
    samples = len(data["forget-text"].read_text().splitlines())
    assert profile["data"] == {
        "split": "forget", "path": str(data["forget-text"]), "samples": samples, "images": 0, "with_options": 0
    }  # fmt: skip
    assert profile["settings"] == {
        "positions": "answer", "batch_size": 2, "batches": (samples + 1) // 2, "device": "cpu", "dtype": "float32",
        "redact": False,
    }  # fmt: skip
    assert profile["outputs"] == [
        {"path": str(target / "p.safetensors"), "kind": "profile", "exists": False, "replaced": False}
    ]

    plan = dry("accessor", "--forget", forget_profile, "--retain", retain_profile, "--out", target / "a.safetensors")
    assert plan["forget_profile"]["num_samples"] == str(samples)
    assert plan["settings"] == {"batch_size": 1, "batches": samples, "save_batches": False, "redact": False}

    plan = dry("apply", "--model", model, "--accessor", accessor, "--layers", "1:2", "--out", target / "u")
    assert plan["layers"] == [1, 2]
    assert plan["edited_tensors"] == {
        "1": "model.layers.1.mlp.down_proj.weight",
        "2": "model.layers.2.mlp.down_proj.weight",
    }
    assert plan["settings"]["gamma"] == 0.02 and plan["settings"]["mode"] == "one-shot"
    assert plan["outputs"] == [{"path": str(target / "u"), "kind": "checkpoint", "exists": False, "replaced": False}]

    plan = dry(
        "apply", "--model", model, "--progressive", "--forget-data", data["forget-text"], "--retain", retain_profile,
        "--layers", ":1", "--batch-size", "3", "--out", target / "p",
    )  # fmt: skip
    assert plan["command"] == "apply --progressive" and plan["layers"] == [0, 1]
    assert plan["settings"]["batches"] == (samples + 2) // 3 and plan["settings"]["positions"] == "answer"
    assert [output["path"] for output in plan["outputs"]] == [
        str(target / "p"),
        str(target / "p.exposure.safetensors"),
    ]

    plan = dry(
        "eval", "--model", unlearned, "--baseline", model, "--data", f"forget={data['forget-text']}",
        "--out", target / "eval.json",
    )  # fmt: skip
    assert list(plan["models"]) == ["model", "baseline"]
    assert plan["models"]["model"]["path"] == str(unlearned.resolve())
    assert plan["data"]["forget"]["samples"] == samples
    assert plan["settings"]["batches"] == 1  # batch size 8
    assert [output["path"] for output in plan["outputs"]] == [
        str(target / "eval.json"),
        str(target / "eval.samples.jsonl"),
    ]

    plan = dry("verify", unlearned, "--base", model, "--accessor", accessor)
    assert plan["mode"] == "one-shot" and plan["layers"] == [1, 2] and plan["redacted"] is False
    assert plan["shards"] == shards  # same layout as its input
    assert plan["base"]["path"] == str(model.resolve()) and plan["outputs"] == []

    assert snapshot(tmp_path, accessor.parent, model) == before  # nothing written, no staging directory
    assert not target.exists()


def test_plan_table_on_stderr_and_nothing_on_stdout(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, no_model_work: list[str]
) -> None:
    result = invoke(
        "apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--layers", "0,2", "--out", tmp_path / "u",
        "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = [" ".join(line.split()) for line in result.stderr.splitlines()]
    assert "layers 0, 2" in lines
    assert "edited_tensors.2 model.layers.2.mlp.down_proj.weight" in lines
    assert any(line.startswith("output checkpoint ") for line in lines) and "(new)" in result.stderr
    assert not (tmp_path / "u").exists()


def test_existing_outputs_are_checked_as_in_a_real_run(
    checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path, tmp_path: Path, no_model_work: list[str]
) -> None:
    out = tmp_path / "a.safetensors"
    forget, retain = accessor.parent / "forget.safetensors", accessor.parent / "retain.safetensors"
    out.write_bytes(accessor.read_bytes())  # a kvwctl stage file: replaceable with --force
    content = out.read_bytes()
    result = invoke("accessor", "--forget", forget, "--retain", retain, "--out", out, "--dry-run")
    assert result.exit_code == 1 and f"Error: output {out} already exists" in result.stderr
    plan = dry("accessor", "--forget", forget, "--retain", retain, "--out", out, "--force")
    assert plan["outputs"] == [{"path": str(out), "kind": "accessor", "exists": True, "replaced": True}]
    assert out.read_bytes() == content  # --force in a dry run replaces nothing


def bad_inputs(root: Path, checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path) -> list[list[str]]:
    """Commands that fail before model work, each for another reason."""
    model = str(checkpoints["qwen2"])
    forget, retain = str(accessor.parent / "forget.safetensors"), str(accessor.parent / "retain.safetensors")
    broken = root / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": "", "answer": "a"}\nnot json\n')
    options = root / "options.jsonl"
    options.write_text('{"question": "q?", "answer": "yes", "options": ["no", "maybe"]}\n')
    existing = root / "existing.safetensors"
    existing.write_text("a user's file")
    return [
        [
            "profile",
            "--model",
            model,
            "--data",
            str(root / "missing.jsonl"),
            "--split",
            "retain",
            "--out",
            str(root / "p"),
        ],
        ["profile", "--model", model, "--data", str(broken), "--split", "retain", "--out", str(root / "p")],
        ["profile", "--model", str(root / "no-model"), "--data", str(data["retain-text"]), "--split", "retain"],
        ["accessor", "--forget", retain, "--retain", retain, "--out", str(root / "a.safetensors")],
        ["accessor", "--forget", forget, "--retain", retain, "--out", str(existing), "--force"],
        ["apply", "--model", model, "--accessor", str(accessor), "--layers", "2:9", "--out", str(root / "u")],
        ["apply", "--model", model, "--accessor", retain, "--out", str(root / "u")],
        ["apply", "--model", model, "--accessor", str(accessor), "--out", model],
        [
            "apply",
            "--model",
            model,
            "--progressive",
            "--forget-data",
            str(data["forget-text"]),
            "--retain",
            forget,
            "--out",
            str(root / "u"),
        ],  # fmt: skip
        ["eval", "--model", model, "--data", f"forget={options}", "--out", str(root / "e.json")],
        [
            "eval",
            "--model",
            model,
            "--data",
            f"forget={data['forget-text']}",
            "--require",
            "forget.mc_acc <= 0.5",
            "--out",
            str(root / "e.json"),
        ],  # fmt: skip
        ["verify", str(root)],
    ]


def test_a_dry_run_of_a_bad_input_fails_as_the_real_run(
    checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path, tmp_path: Path, no_model_work: list[str]
) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    for args in bad_inputs(root, checkpoints, data, accessor):
        before = snapshot(tmp_path)
        real = invoke(*args)
        assert real.exit_code in (1, 2), (args, real.output)
        assert "Error: " in real.stderr and "Traceback" not in real.output
        dry_run = invoke(*args, "--dry-run")
        assert (dry_run.exit_code, dry_run.stderr, dry_run.stdout) == (real.exit_code, real.stderr, real.stdout), args
        assert snapshot(tmp_path) == before, args


def test_the_patches_catch_model_work(
    checkpoints: dict[str, Path],
    data: dict[str, Path],
    accessor: Path,
    unlearned: Path,
    tmp_path: Path,
    no_model_work: list[str],
) -> None:
    """The same commands without --dry-run do reach the patched functions (the test above can fail)."""
    model = checkpoints["qwen2"]
    runs = [
        ("profile", "--model", model, "--data", data["forget-text"], "--split", "forget", "--out", tmp_path / "p"),
        ("apply", "--model", model, "--accessor", accessor, "--out", tmp_path / "u"),
        ("verify", unlearned),
    ]
    for args in runs:
        result = invoke(*args)
        assert isinstance(result.exception, AssertionError), (args, result.output)
    assert no_model_work == ["fingerprint", "fingerprint", "verify file_sha256"]
    no_model_work.clear()
    assert not (tmp_path / "p").exists() and not (tmp_path / "u").exists()
