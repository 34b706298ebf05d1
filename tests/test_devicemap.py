"""Models larger than one device (kvwctl.placement): --device-map, --max-memory, disk offload.

On the CPU, part of a tiny model is forced onto accelerate's disk offload (an explicit device map,
or ``auto`` with a CPU memory limit smaller than the model); every stage's outputs must equal the
plain CPU run's byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, invoke
from safetensors.torch import load_file

from kvwctl.checkpoint import open_checkpoint
from kvwctl.errors import UsageError
from kvwctl.modeling import load_model
from kvwctl.placement import Placement, parse_max_memory, read_weight
from kvwctl.source import resolve_model
from kvwctl.trials import TrialModel

# LLaVA's modules with layers 1 and 2 of the language model (edited below), the projector and the
# head on disk: accelerate keeps them on the meta device and loads them for every forward pass.
LLAVA_MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "disk",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "disk",
    "model.language_model.layers.3": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture
def device_map(tmp_path: Path) -> Path:
    path = tmp_path / "device-map.json"
    path.write_text(json.dumps(LLAVA_MAP))
    return path


def _same_tensors(first: Path, second: Path) -> None:
    one, two = load_file(first), load_file(second)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_max_memory_is_read_as_accelerate_reads_it() -> None:
    assert parse_max_memory("0=20GiB, 1=1.5GB,cpu=60GiB,mps=1000") == {
        0: 20 * 2**30,
        1: 1_500_000_000,
        "cpu": 60 * 2**30,
        "mps": 1000,
    }
    for text, message in [
        ("20GiB", "KEY=SIZE"),
        ("gpu=1GB", "unknown device 'gpu'"),
        ("0=lots", "unreadable size 'lots'"),
        ("0=1GB,0=2GB", "names 0 twice"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_max_memory(text)


def test_profile_with_layers_on_disk_equals_the_plain_run(
    checkpoints: dict[str, Path], data: dict[str, Path], device_map: Path, tmp_path: Path
) -> None:
    common = ("profile", "--split", "forget", "--model", checkpoints["llava"], "--data", data["forget"])
    assert invoke(*common, "--out", tmp_path / "plain.safetensors").exit_code == 0
    offload = tmp_path / "offload"
    result = invoke(
        *common, "--out", tmp_path / "map.safetensors", "--device-map", device_map, "--offload-folder", offload
    )
    assert result.exit_code == 0, result.output
    # transformers reads disk-mapped weights stored as safetensors in place; the folder is for the rest.
    assert offload.is_dir()
    _same_tensors(tmp_path / "plain.safetensors", tmp_path / "map.safetensors")


def test_auto_with_a_small_cpu_limit_offloads_and_gives_the_same_profile(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = open_checkpoint(resolve_model(str(checkpoints["qwen2_vl"]), None))
    placement = Placement(device_map="auto", max_memory="cpu=150KB")  # the model is about 400 KB
    loaded = load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32, placement=placement)
    placed = set(loaded.model.hf_device_map.values())
    assert "disk" in placed and loaded.device == torch.device("cpu")
    assert len(placement._temporaries) == 1  # no --offload-folder: a temporary one
    del loaded
    common = ("profile", "--split", "retain", "--model", checkpoints["qwen2_vl"], "--data", data["retain"])
    assert invoke(*common, "--out", tmp_path / "plain.safetensors").exit_code == 0
    result = invoke(
        *common, "--out", tmp_path / "auto.safetensors", "--device-map", "auto", "--max-memory", "cpu=150KB"
    )
    assert result.exit_code == 0, result.output
    _same_tensors(tmp_path / "plain.safetensors", tmp_path / "auto.safetensors")


def test_progressive_apply_edits_offloaded_layers_as_the_plain_run(
    checkpoints: dict[str, Path], data: dict[str, Path], device_map: Path, tmp_path: Path
) -> None:
    model = checkpoints["llava"]
    retain = tmp_path / "retain.safetensors"
    result = invoke("profile", "--split", "retain", "--model", model, "--data", data["retain"], "--out", retain)
    assert result.exit_code == 0, result.output
    common: tuple[str | Path, ...] = ("apply", "--model", model, "--progressive", "--forget-data", data["forget"])
    common += ("--retain", retain, "--gamma", "1", "--layers", "0:2")  # layers 1 and 2 are on disk
    assert invoke(*common, "--out", tmp_path / "plain").exit_code == 0
    result = invoke(*common, "--out", tmp_path / "mapped", "--device-map", device_map)
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "plain").glob("*.safetensors"))
    assert shards
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "mapped" / shard.name).read_bytes(), shard.name
    plain_exposure = (tmp_path / "plain.exposure.safetensors").read_bytes()
    assert plain_exposure == (tmp_path / "mapped.exposure.safetensors").read_bytes()
    assert any(
        load_file(tmp_path / "plain.exposure.safetensors")[f"layers.{layer}.exposure"].sum() > 0 for layer in (1, 2)
    )


def test_eval_with_a_device_map_equals_the_plain_run(
    checkpoints: dict[str, Path], data: dict[str, Path], device_map: Path, tmp_path: Path
) -> None:
    common = ("eval", "--model", checkpoints["llava"], "--data", f"forget={data['forget']}", "--max-new-tokens", "4")
    assert invoke(*common, "--out", tmp_path / "plain.json").exit_code == 0
    result = invoke(*common, "--out", tmp_path / "mapped.json", "--device-map", device_map)
    assert result.exit_code == 0, result.output
    plain = (tmp_path / "plain.samples.jsonl").read_text()
    assert plain and plain == (tmp_path / "mapped.samples.jsonl").read_text()


def test_tune_trials_weaken_and_restore_offloaded_weights(checkpoints: dict[str, Path], device_map: Path) -> None:
    """TrialModel (tune) edits an offloaded down projection through its offload map, and restores it."""
    checkpoint = open_checkpoint(resolve_model(str(checkpoints["llava"]), None))
    plain = load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    mapped = load_model(
        checkpoint, device=torch.device("cpu"), dtype=torch.float32, placement=Placement(device_map=str(device_map))
    )
    assert mapped.down_projections[1].weight.device.type == "meta"
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    exposures = [torch.linspace(0, 3, module.weight.shape[1], dtype=torch.float64) for module in plain.down_projections]
    outputs = []
    for loaded in (plain, mapped):
        trial = TrialModel(loaded)
        with torch.inference_mode():
            before = loaded.model(input_ids=ids).logits
            with trial.weakened(exposures, 0.5, [1, 2]):
                weakened = loaded.model(input_ids=ids).logits
            after = loaded.model(input_ids=ids).logits
        assert not torch.equal(before, weakened) and torch.equal(before, after)
        outputs.append((before, weakened))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert torch.equal(read_weight(mapped.down_projections[1]), plain.down_projections[1].weight.detach())


def test_placement_errors(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    common: tuple[str | Path, ...] = (
        "profile",
        "--split",
        "forget",
        "--model",
        checkpoints["llava"],
        "--data",
        data["forget"],
    )
    common += ("--out", tmp_path / "out.safetensors")
    expect_error(invoke(*common, "--device-map", "auto", "--device", "cpu"), "--device and --device-map", 2)
    expect_error(invoke(*common, "--max-memory", "cpu=1GB"), "--max-memory applies with --device-map only", 2)
    expect_error(invoke(*common, "--device-map", "auto", "--max-memory", "cpu"), "--max-memory must be KEY=SIZE", 2)
    expect_error(invoke(*common, "--device-map", "everywhere"), "--device-map must be auto", 2)
    expect_error(invoke(*common, "--device-map", tmp_path / "missing.json"), "missing.json: no such file", 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model.vision_tower": "gpu"}))
    expect_error(invoke(*common, "--device-map", bad), "module 'model.vision_tower' has device 'gpu'", 1)
    result = invoke("apply", "--model", checkpoints["llava"], "--device-map", "auto")
    expect_error(result, "--device-map applies to --progressive only", 2)
    assert not (tmp_path / "out.safetensors").exists()
