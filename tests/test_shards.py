"""``profile --shard K/N`` and ``profile merge``: the shards' shares, the merged profile equal to one
run's, the accessor reading shards, and every refusal (incomplete, duplicated, mismatched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, invoke
from safetensors import safe_open

from kvwctl.artifacts import PROFILE_PART_FORMAT
from kvwctl.errors import UsageError
from kvwctl.files import save_safetensors_atomically
from kvwctl.shards import Shard, parse_shard, shard_samples
from kvwctl.testing import build_checkpoint, write_samples


def test_shares_are_whole_batches_in_order() -> None:
    # 7 samples in batches of 2: batches [0,2) [2,4) [4,6) [6,7); 3 shards take 1, 1 and 2 of them.
    assert [shard_samples(7, 2, Shard(number, 3)) for number in (1, 2, 3)] == [range(0, 2), range(2, 4), range(4, 7)]
    assert [shard_samples(10, 3, Shard(number, 2)) for number in (1, 2)] == [range(0, 6), range(6, 10)]
    assert shard_samples(5, 8, Shard(1, 1)) == range(0, 5)
    with pytest.raises(UsageError, match="7 samples make 4 batches of 2, too few for 5 shards"):
        shard_samples(7, 2, Shard(5, 5))


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_bad_shard_text(text: str) -> None:
    with pytest.raises(UsageError, match="is not K/N with 1 <= K <= N"):
        parse_shard(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny qwen2, forget (7) and retain (9) text splits, each profiled whole and in 3 shards."""
    root = tmp_path_factory.mktemp("shards")
    files = {
        "model": build_checkpoint("qwen2", root / "qwen2"),
        "forget-data": write_samples(root / "forget.jsonl", count=7, with_images=False),
        "retain-data": write_samples(root / "retain.jsonl", count=9, with_images=False, offset=7),
    }
    for split in ("forget", "retain"):
        base: list[str | Path] = ["profile", "--model", files["model"], "--data", files[f"{split}-data"]]
        base += ["--split", split]
        base += ["--batch-size", "2"]
        files[split] = root / f"{split}.safetensors"
        result = invoke(*base, "--out", files[split])
        assert result.exit_code == 0, result.output
        for number in (1, 2, 3):
            files[f"{split}-{number}"] = root / f"{split}-{number}.safetensors"
            result = invoke(*base, "--shard", f"{number}/3", "--out", files[f"{split}-{number}"])
            assert result.exit_code == 0, result.output
    return files


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as stream:
        return dict(stream.metadata() or {})


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as stream:
        return {name: stream.get_tensor(name) for name in stream.keys()}


def test_partial_profile_metadata(setup: dict[str, Path]) -> None:
    metadata = metadata_of(setup["forget-3"])
    assert metadata["format"] == PROFILE_PART_FORMAT
    assert (metadata["shard_index"], metadata["shard_count"], metadata["shard_samples"]) == ("3", "3", "[4, 7]")
    assert (metadata["num_samples"], metadata["data_num_samples"]) == ("3", "7")
    # Positions 4-6 of the length order: which samples they are is sample_order, row by row.
    order = json.loads(metadata["sample_order"])
    assert len(order) == 3 and len(set(order)) == 3 and all(0 <= index < 7 for index in order)
    assert json.loads(metadata["sample_ids"]) == [f"s{index}" for index in order]
    whole = tensors_of(setup["forget"])
    part = tensors_of(setup["forget-3"])
    assert torch.equal(part["layers.1.sum"], whole["layers.1.sum"][order])  # the very rows of one run
    assert torch.equal(part["count"], whole["count"][order])
    retain_part = tensors_of(setup["retain-1"])
    assert retain_part["count"].shape == () and retain_part["layers.0.sum"].dim() == 1  # pooled over its samples


def test_merge_equals_the_single_run(setup: dict[str, Path], tmp_path: Path) -> None:
    forget = tmp_path / "forget.safetensors"
    # Any order on the command line: the shards are put in shard order.
    result = invoke("profile", "merge", setup["forget-2"], setup["forget-3"], setup["forget-1"], "--out", forget)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(forget)
    assert "Merged 3 shards: 7 samples" in result.stderr
    assert forget.read_bytes() == setup["forget"].read_bytes()  # per-sample rows: byte for byte

    retain = tmp_path / "retain.safetensors"
    result = invoke("profile", "merge", *(setup[f"retain-{n}"] for n in (1, 2, 3)), "--out", retain, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "path": str(retain), "split": "retain", "samples": 9, "positions": int(metadata_of(retain)["num_positions"]),
        "shards": 3,
    }  # fmt: skip
    assert metadata_of(retain) == metadata_of(setup["retain"])
    merged, whole = tensors_of(retain), tensors_of(setup["retain"])
    assert merged.keys() == whole.keys() and torch.equal(merged["count"], whole["count"])
    parts = [tensors_of(setup[f"retain-{n}"]) for n in (1, 2, 3)]
    for name in whole:
        # The pooled sums added shard by shard: the single run's to float64 rounding.
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-13, atol=0)
        assert torch.equal(merged[name], parts[0][name] + parts[1][name] + parts[2][name])


def test_accessor_reads_shards(setup: dict[str, Path], tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    assert invoke("accessor", "--forget", setup["forget"], "--retain", setup["retain"], "--out", whole).exit_code == 0
    sharded = tmp_path / "sharded.safetensors"
    forget_parts = [arg for n in (1, 2, 3) for arg in ("--forget", setup[f"forget-{n}"])]
    retain_parts = [arg for n in (3, 1, 2) for arg in ("--retain", setup[f"retain-{n}"])]
    result = invoke("accessor", *forget_parts, *retain_parts, "--out", sharded)
    assert result.exit_code == 0, result.output
    expected, found = tensors_of(whole), tensors_of(sharded)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-6, atol=0)
    metadata = metadata_of(sharded)
    assert json.loads(metadata["forget_profile"]) == [str(setup[f"forget-{n}"]) for n in (1, 2, 3)]
    assert len(json.loads(metadata["retain_profile_sha256"])) == 3
    # A lone shard is not a profile: it is merged (and refused as incomplete).
    lone = invoke("accessor", "--forget", setup["forget-1"], "--retain", setup["retain"], "--out", tmp_path / "x")
    expect_error(lone, "the shards are incomplete: 2/3, 3/3 missing (1 of 3 given)")


def test_merge_refusals(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    forget = [setup[f"forget-{n}"] for n in (1, 2, 3)]
    expect_error(invoke("profile", "merge", *forget[:2], "--out", out), "the shards are incomplete: 3/3 missing")
    expect_error(
        invoke("profile", "merge", forget[0], forget[1], forget[1], forget[2], "--out", out),
        f"shard 2/3 is given twice: {forget[1]} and {forget[1]}",
    )
    expect_error(
        invoke("profile", "merge", forget[0], setup["retain-2"], forget[2], "--out", out),
        "are not parts of one profile: data_sha256 is",
    )
    expect_error(
        invoke("profile", "merge", setup["forget"], *forget, "--out", out), "is a complete profile, not a shard of one"
    )
    # A shard whose range is not the one the split and batch size give it.
    altered = tmp_path / "altered.safetensors"
    metadata = metadata_of(forget[2]) | {"shard_samples": "[3, 7]"}
    save_safetensors_atomically(tensors_of(forget[2]), altered, metadata)
    expect_error(
        invoke("profile", "merge", forget[0], forget[1], altered, "--out", out),
        "shard 3/3 holds samples [3, 7]; 7 samples in batches of 2 give it [4, 7]",
    )
    assert not out.exists()
    assert invoke("profile", "merge", *forget, "--out", out).exit_code == 0
    expect_error(invoke("profile", "merge", *forget, "--out", out), "already exists")


def test_shard_usage_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    base: list[str | Path] = ["profile", "--model", setup["model"], "--data", setup["forget-data"], "--split", "forget"]
    expect_error(
        invoke(*base, "--shard", "5/5", "--batch-size", "2", "--out", tmp_path / "f"),
        "--shard 5/5: 7 samples make 4 batches of 2, too few for 5 shards",
        exit_code=2,
    )
    expect_error(invoke(*base, "--shard", "0/3", "--out", tmp_path / "f"), "--shard '0/3' is not K/N", exit_code=2)
    wrong = invoke("profile", "--split", "retain", "merge", setup["forget-1"], "--out", tmp_path / "m")
    expect_error(wrong, "--split is not an option of 'profile merge'", exit_code=2)
