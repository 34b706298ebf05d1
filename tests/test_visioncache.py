"""The vision-feature cache (kvwctl.visioncache): same results, no second vision-tower pass.

Every test counts the calls of the vision tower's top module (a global forward hook) and compares
stage outputs with a run without the cache, tensor by tensor, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import copy_checkpoint, expect_error, invoke
from safetensors.torch import load_file, save_file

from kvwctl.testing import make_image

VISION_TOWERS = ("CLIPVisionModel", "Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel")


@pytest.fixture
def vision_calls() -> Iterator[list[str]]:
    """The class name of every vision-tower forward pass while the test runs."""
    calls: list[str] = []

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        if type(module).__name__ in VISION_TOWERS:
            calls.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


@pytest.fixture(scope="module")
def images_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Samples with one, two (in both orders) and no images, an image repeated across samples."""
    root = tmp_path_factory.mktemp("vision-data")
    for index in range(3):
        make_image(root / "images" / f"i{index}.png", seed=100 + index, size=28)
    records = [
        {"id": "a", "image": "images/i0.png", "question": "Who is this person?", "answer": "Mira Okafor"},
        {"id": "b", "image": ["images/i1.png", "images/i2.png"], "question": "Who are they?", "answer": "Lena Park"},
        {"id": "c", "question": "Where was Ade Bello born?", "answer": "Ade Bello was born in Lima."},
        {"id": "d", "image": ["images/i2.png", "images/i0.png"], "question": "Who are they?", "answer": "Ivo Marin"},
        {"id": "e", "image": "images/i1.png", "question": "Who is this person?", "answer": "Sana Rao"},
    ]
    path = root / "samples.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _profile(model: Path, data: Path, out: Path, *extra: str | Path) -> dict[str, torch.Tensor]:
    result = invoke(
        "profile", "--split", "forget", "--model", model, "--data", data, "--out", out, "--batch-size", "2", *extra
    )
    assert result.exit_code == 0, result.output
    return load_file(out)


def _assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_cold_and_warm_profiles_equal_the_uncached_one_and_warm_never_runs_the_tower(
    model_type: str, checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, vision_calls: list[str]
) -> None:
    model, cache = checkpoints[model_type], tmp_path / "cache"
    plain = _profile(model, images_data, tmp_path / "plain.safetensors", "--vision-cache", "off")
    plain_calls = len(vision_calls)
    assert plain_calls == 3  # batches (a, b), (c, d), (e): each with images
    cold = _profile(model, images_data, tmp_path / "cold.safetensors", "--vision-cache", cache)
    # Cold: one tower call per batch with a new image. Batches are formed in length order (image
    # count first): (c, one of a/e), (the other, one of b/d), (the other): the first two batches
    # bring new images, the third's are all seen.
    assert len(vision_calls) - plain_calls == 2
    assert len(_entries(cache)) == 3  # one entry per distinct image
    del vision_calls[:]
    warm = _profile(model, images_data, tmp_path / "warm.safetensors", "--vision-cache", cache)
    assert vision_calls == []
    _assert_same(plain, cold)
    _assert_same(plain, warm)


def test_an_edited_language_model_hits_the_original_entries(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, vision_calls: list[str]
) -> None:
    """Progressive apply fills the cache on the original model; eval of original and unlearned
    models and a profile of the unlearned one reuse it (their vision weights are the same bytes)."""
    model, cache = checkpoints["llava"], tmp_path / "cache"
    retain = tmp_path / "retain.safetensors"
    invoke(
        "profile",
        "--split",
        "retain",
        "--model",
        model,
        "--data",
        images_data,
        "--out",
        retain,
        "--vision-cache",
        "off",
    )
    plain_out, cached_out = tmp_path / "plain", tmp_path / "cached"
    common = ("--progressive", "--forget-data", images_data, "--retain", retain, "--gamma", "1", "--layers", "1:3")
    result = invoke("apply", "--model", model, *common, "--out", plain_out, "--vision-cache", "off")
    assert result.exit_code == 0, result.output
    del vision_calls[:]
    result = invoke("apply", "--model", model, *common, "--out", cached_out, "--vision-cache", cache)
    assert result.exit_code == 0, result.output
    assert len(vision_calls) == 2  # forget batches a (i0) and b (i1, i2); every later step hits
    for shard in sorted(plain_out.glob("*.safetensors")):
        assert shard.read_bytes() == (cached_out / shard.name).read_bytes(), shard.name
    del vision_calls[:]
    uncached = _profile(plain_out, images_data, tmp_path / "u-plain.safetensors", "--vision-cache", "off")
    assert vision_calls
    del vision_calls[:]
    cached = _profile(cached_out, images_data, tmp_path / "u-cached.safetensors", "--vision-cache", cache)
    assert vision_calls == []
    _assert_same(uncached, cached)

    # eval generates and scores through the (already warm) cache; the per-sample results are unchanged.
    results: dict[str, str] = {}
    for setting in ("off", str(cache)):
        del vision_calls[:]
        out = tmp_path / f"eval-{len(results)}.json"
        args = ("--model", cached_out, "--data", f"forget={images_data}", "--out", out, "--max-new-tokens", "4")
        result = invoke("eval", *args, "--vision-cache", setting)
        assert result.exit_code == 0, result.output
        results[setting] = out.with_suffix(".samples.jsonl").read_text()
        assert bool(vision_calls) == (setting == "off")
    assert results["off"] == results[str(cache)]


def _rewrite_tensor(checkpoint: Path, name: str, change: float) -> None:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] + change
    save_file(tensors, shard, metadata={"format": "pt"})


def test_a_changed_vision_weight_misses(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, vision_calls: list[str]
) -> None:
    model, cache = checkpoints["llava"], tmp_path / "cache"
    _profile(model, images_data, tmp_path / "original.safetensors", "--vision-cache", cache)
    changed = copy_checkpoint(model, tmp_path / "changed")
    index = json.loads((changed / "model.safetensors.index.json").read_text())
    projector = next(name for name in index["weight_map"] if "multi_modal_projector" in name and "weight" in name)
    _rewrite_tensor(changed, projector, 0.01)
    del vision_calls[:]
    cached = _profile(changed, images_data, tmp_path / "changed.safetensors", "--vision-cache", cache)
    assert len(vision_calls) == 2 and len(_entries(cache)) == 6  # its own entries, beside the original's
    _assert_same(_profile(changed, images_data, tmp_path / "uncached.safetensors", "--vision-cache", "off"), cached)

    # A language-model tensor changed by hand (not by kvwctl) is not a vision weight: still hits.
    edited = copy_checkpoint(model, tmp_path / "edited")
    down = next(name for name in index["weight_map"] if "layers.1.mlp.down_proj" in name)
    _rewrite_tensor(edited, down, 0.01)
    del vision_calls[:]
    _profile(edited, images_data, tmp_path / "edited.safetensors", "--vision-cache", cache)
    assert vision_calls == []


def test_a_changed_image_size_misses(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, vision_calls: list[str]
) -> None:
    model, cache = checkpoints["qwen2_vl"], tmp_path / "cache"
    _profile(model, images_data, tmp_path / "original.safetensors", "--vision-cache", cache)
    resized = copy_checkpoint(model, tmp_path / "resized")
    config = json.loads((resized / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}  # 16 tokens, not 4
    (resized / "processor_config.json").write_text(json.dumps(config))
    del vision_calls[:]
    cached = _profile(resized, images_data, tmp_path / "resized.safetensors", "--vision-cache", cache)
    assert len(vision_calls) == 2 and len(_entries(cache)) == 6
    _assert_same(_profile(resized, images_data, tmp_path / "uncached.safetensors", "--vision-cache", "off"), cached)


def test_a_corrupt_or_mismatched_entry_is_recomputed_not_trusted(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, vision_calls: list[str]
) -> None:
    model, cache = checkpoints["llava"], tmp_path / "cache"
    plain = _profile(model, images_data, tmp_path / "plain.safetensors", "--vision-cache", "off")
    _profile(model, images_data, tmp_path / "cold.safetensors", "--vision-cache", cache)
    entries = _entries(cache)
    good = {entry: entry.read_bytes() for entry in entries}
    entries[0].write_bytes(b"not a safetensors file")  # unreadable
    # Valid safetensors, right key, features changed without updating their digest.
    stored = load_file(entries[1])
    from safetensors import safe_open

    with safe_open(str(entries[1]), framework="pt") as stream:
        metadata = stream.metadata()
    save_file({"features": stored["features"] + 1}, entries[1], metadata=metadata)
    shutil.copyfile(entries[2], entries[2].with_suffix(".tmp"))  # stray files are ignored
    del vision_calls[:]
    again = _profile(model, images_data, tmp_path / "again.safetensors", "--vision-cache", cache)
    assert len(vision_calls) >= 1
    _assert_same(plain, again)
    for entry in entries:  # rewritten: the same bytes as the first time
        assert entry.read_bytes() == good[entry], entry


def test_kvw_toml_puts_the_cache_in_the_workdir_and_text_models_ignore_it(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kvw.toml"
    config.write_text(f'model = "{checkpoints["llava"]}"\nworkdir = "run"\n[splits]\nforget = "{images_data}"\n')
    monkeypatch.chdir(tmp_path)
    result = invoke("profile", "--split", "forget")
    assert result.exit_code == 0, result.output
    assert len(_entries(tmp_path / "run" / "vision-cache")) == 3
    result = invoke("profile", "--split", "forget", "--vision-cache", "off", "--out", tmp_path / "off.safetensors")
    assert result.exit_code == 0, result.output
    _assert_same(load_file(tmp_path / "run" / "profile-forget.safetensors"), load_file(tmp_path / "off.safetensors"))
    text = tmp_path / "text.jsonl"
    text.write_text(images_data.read_text().splitlines()[2] + "\n")
    result = invoke(
        "profile", "--split", "retain", "--model", checkpoints["qwen2"], "--data", text,
        "--out", tmp_path / "text.safetensors", "--vision-cache", tmp_path / "text-cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "text-cache").exists()


def test_the_cache_may_not_be_written_into_the_checkpoint(
    checkpoints: dict[str, Path], images_data: Path, tmp_path: Path
) -> None:
    model = copy_checkpoint(checkpoints["llava"], tmp_path / "model")
    args = (
        "profile",
        "--split",
        "forget",
        "--model",
        model,
        "--data",
        images_data,
        "--out",
        tmp_path / "p.safetensors",
    )
    expect_error(invoke(*args, "--vision-cache", model / "cache"), "is inside the checkpoint", 1)
    assert sorted(path.name for path in model.iterdir()) == sorted(path.name for path in checkpoints["llava"].iterdir())

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    expect_error(invoke(*args, "--vision-cache", not_a_folder), "is not a folder", 1)
