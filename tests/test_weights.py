"""What a model loads is what was checked, and the fingerprint covers every tensor (issue 9, class 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import expect_error, invoke
from safetensors.torch import load_file, save_file
from typer.testing import Result

from kvwctl.checkpoint import INDEX_FILE, canonical_tensor_name, open_checkpoint
from kvwctl.errors import ModelError
from kvwctl.source import ModelSource

MODEL = "qwen2"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def opened(path: Path) -> ModelSource:
    return ModelSource(path, str(path), None)


def copy_model(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    shutil.copytree(checkpoints[MODEL], tmp_path / "model")
    return tmp_path / "model"


def shard_of(model: Path, name: str) -> Path:
    weight_map: dict[str, str] = json.loads((model / INDEX_FILE).read_text())["weight_map"]
    return model / weight_map[name]


def rewrite_shard(shard: Path, change: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or delete (None) tensors of a shard; the index is left as it is."""
    tensors = load_file(shard)
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})


def profile(model: Path, data: dict[str, Path], out: Path) -> Result:
    return invoke("profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", out)


def test_a_tensor_missing_from_its_shard_is_an_error_naming_it(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_model(checkpoints, tmp_path)
    shard = shard_of(model, Q_PROJ)
    rewrite_shard(shard, {Q_PROJ: None})
    result = profile(model, data, tmp_path / "p.safetensors")
    expect_error(result, f"{INDEX_FILE} lists tensor {Q_PROJ} in {shard.name}, but no shard holds it")
    assert not (tmp_path / "p.safetensors").exists()


def test_a_tensor_missing_from_shard_and_index_is_refused_at_load(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_model(checkpoints, tmp_path)
    rewrite_shard(shard_of(model, Q_PROJ), {Q_PROJ: None})
    index = json.loads((model / INDEX_FILE).read_text())
    del index["weight_map"][Q_PROJ]
    (model / INDEX_FILE).write_text(json.dumps(index))
    result = profile(model, data, tmp_path / "p.safetensors")
    expect_error(result, "the weights do not fit the model that config.json describes")
    expect_error(result, f"missing from the checkpoint (transformers would initialise it at random): {Q_PROJ}")


def test_a_shape_mismatch_is_an_error_naming_the_tensor(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_model(checkpoints, tmp_path)
    shard = shard_of(model, Q_PROJ)
    rows, columns = load_file(shard)[Q_PROJ].shape
    rewrite_shard(shard, {Q_PROJ: torch.zeros(rows, columns + 1)})
    result = profile(model, data, tmp_path / "p.safetensors")
    expect_error(
        result, f"shape [{rows}, {columns + 1}] on disk, but config.json makes it [{rows}, {columns}]: {Q_PROJ}"
    )


def test_an_unexpected_tensor_is_an_error_naming_it(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = copy_model(checkpoints, tmp_path)
    shard = shard_of(model, Q_PROJ)
    rewrite_shard(shard, {"model.layers.1.self_attn.extra.weight": torch.zeros(2)})
    expect_error(profile(model, data, tmp_path / "a.safetensors"), "which model.safetensors.index.json does not list")
    index = json.loads((model / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.1.self_attn.extra.weight"] = shard.name
    (model / INDEX_FILE).write_text(json.dumps(index))
    result = profile(model, data, tmp_path / "b.safetensors")
    expect_error(result, "not a weight of Qwen2ForCausalLM: model.layers.1.self_attn.extra.weight")


def test_a_tensor_in_two_shards_or_in_the_wrong_one_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(checkpoints, tmp_path)
    shard = shard_of(model, Q_PROJ)
    other = next(path for path in sorted(model.glob("*.safetensors")) if path != shard)
    weight = load_file(shard)[Q_PROJ]
    rewrite_shard(other, {Q_PROJ: weight})
    with pytest.raises(ModelError, match=f"tensor {Q_PROJ} is stored twice"):
        open_checkpoint(opened(model))
    rewrite_shard(shard, {Q_PROJ: None})
    with pytest.raises(ModelError, match=f"lists tensor {Q_PROJ} in {shard.name}, but it is in {other.name}"):
        open_checkpoint(opened(model))


def flip_a_byte(model: Path, name: str) -> None:
    tensor = next(entry for entry in open_checkpoint(opened(model)).tensors if entry.name == name)
    with (model / tensor.shard).open("r+b") as stream:
        stream.seek(tensor.data_start)
        byte = stream.read(1)
        stream.seek(tensor.data_start)
        stream.write(bytes([byte[0] ^ 0x01]))


def test_one_q_proj_byte_changes_the_fingerprint_and_stage_files_are_refused(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    original = checkpoints[MODEL]
    model = copy_model(checkpoints, tmp_path)
    assert open_checkpoint(opened(model)).fingerprint() == open_checkpoint(opened(original)).fingerprint()
    flip_a_byte(model, Q_PROJ)
    changed = open_checkpoint(opened(model)).fingerprint()
    assert changed != open_checkpoint(opened(original)).fingerprint()
    retain = tmp_path / "retain.safetensors"
    assert profile(original, data, retain).exit_code == 0
    result = invoke("apply", "--model", model, "--progressive", "--forget-data", data["forget-text"], "--retain", retain,
                    "--out", tmp_path / "out")  # fmt: skip
    expect_error(result, f"not from {model} (fingerprint {changed[:12]})")
    assert not (tmp_path / "out").exists()


def test_every_tensor_counts_not_only_the_down_projections(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(checkpoints, tmp_path)
    fingerprints = {open_checkpoint(opened(model)).fingerprint()}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", Q_PROJ):
        flip_a_byte(model, name)
        fingerprints.add(open_checkpoint(opened(model)).fingerprint())
    assert len(fingerprints) == 5


def test_vision_weights_count_and_layouts_share_the_fingerprint(
    checkpoints: dict[str, Path], module_layout_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    for model_type, module_layout in module_layout_checkpoints.items():
        hub = open_checkpoint(opened(checkpoints[model_type]))
        assert hub.fingerprint() == open_checkpoint(opened(module_layout)).fingerprint(), model_type
    model = tmp_path / "llava"
    shutil.copytree(checkpoints["llava"], model)
    before = open_checkpoint(opened(model)).fingerprint()
    vision = next(entry.name for entry in open_checkpoint(opened(model)).tensors if "vision_tower" in entry.name)
    flip_a_byte(model, vision)
    assert open_checkpoint(opened(model)).fingerprint() != before


def test_canonical_tensor_names() -> None:
    assert (
        canonical_tensor_name("language_model.model.layers.3.mlp.down_proj.weight") == "layers.3.mlp.down_proj.weight"
    )
    assert (
        canonical_tensor_name("model.language_model.layers.3.mlp.down_proj.weight") == "layers.3.mlp.down_proj.weight"
    )
    assert canonical_tensor_name("language_model.lm_head.weight") == canonical_tensor_name("lm_head.weight")
    assert canonical_tensor_name("visual.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert canonical_tensor_name("model.visual.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"


def test_the_fingerprint_reads_each_shard_once_and_the_cache_follows_changes(
    checkpoints: dict[str, Path], tmp_path: Path, hash_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.checkpoint

    model = copy_model(checkpoints, tmp_path)
    reads: list[Path] = []
    real = kvwctl.checkpoint._hash_tensors

    def counting(path: Path, tensors: list[kvwctl.checkpoint.StoredTensor]) -> dict[str, str]:
        reads.append(path)
        return real(path, tensors)

    monkeypatch.setattr(kvwctl.checkpoint, "_hash_tensors", counting)
    checkpoint = open_checkpoint(opened(model))
    first = checkpoint.fingerprint()
    assert sorted(reads) == sorted(model / shard for shard in checkpoint.shards)
    assert (hash_cache / "hashes.json").is_file()
    reads.clear()
    assert open_checkpoint(opened(model)).fingerprint() == first and reads == []  # all from the cache
    flip_a_byte(model, Q_PROJ)
    assert open_checkpoint(opened(model)).fingerprint() != first
    assert reads == [shard_of(model, Q_PROJ)]  # only the changed shard is read again
    (hash_cache / "hashes.json").write_text("{not json")  # a corrupt cache is only a cache
    assert open_checkpoint(opened(model)).fingerprint() != first
