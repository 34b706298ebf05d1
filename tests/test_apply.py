"""apply, byte for byte: untouched tensors and files identical, edited vectors equal W * g."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import transformers
from helpers import MULTIMODAL, split_for

from kvwctl.accessor import run_accessor
from kvwctl.apply import ApplyResult, LayerEdit, run_apply
from kvwctl.artifacts import ACCESSOR_FORMAT, Artifact, read_artifact
from kvwctl.checkpoint import MANIFEST_FILE, open_checkpoint
from kvwctl.data import load_image
from kvwctl.files import file_sha256
from kvwctl.headers import read_safetensors_header
from kvwctl.method import gates
from kvwctl.options import AccessorOptions, ApplyOptions, ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.progressive import run_progressive
from kvwctl.source import ModelSpec, resolve_model


def tensor_bytes_on_disk(checkpoint: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes, read straight from the shard files."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    result = {}
    for shard in sorted(set(index["weight_map"].values())):
        data_start, header = read_safetensors_header(checkpoint / shard)
        raw = (checkpoint / shard).read_bytes()
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                result[name] = raw[data_start + begin : data_start + end]
    return result


def load_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    with safe_open(str(checkpoint / index["weight_map"][name]), framework="pt") as stream:
        tensor: torch.Tensor = stream.get_tensor(name)
    return tensor


@pytest.fixture(scope="module")
def pipelines(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Path]]:
    """Profiles and a batch-size-1 accessor for each model type."""
    result = {}
    for model_type in ("llava", "qwen2_vl", "qwen2"):
        root = tmp_path_factory.mktemp(f"pipeline-{model_type}")
        model = str(checkpoints[model_type])
        retain = run_profile(
            ModelSpec(model),
            split_for(model_type, data, "retain"),
            root / "r.safetensors",
            ProfileOptions(split="retain"),
        ).path
        forget = run_profile(
            ModelSpec(model),
            split_for(model_type, data, "forget"),
            root / "f.safetensors",
            ProfileOptions(split="forget", batch_size=1),
        ).path
        accessor = run_accessor(forget, retain, root / "a.safetensors", AccessorOptions(batch_size=1)).path
        result[model_type] = {"retain": retain, "forget": forget, "accessor": accessor}
    return result


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_apply_byte_for_byte(
    model_type: str, checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    source = checkpoints[model_type]
    accessor = pipelines[model_type]["accessor"]
    gamma, layers = 0.7, [1, 2]
    result = run_apply(ModelSpec(str(source)), accessor, tmp_path / "out", ApplyOptions(gamma=gamma, layers="1:2"))
    out = result.path

    checkpoint = open_checkpoint(resolve_model(str(source)))
    edited = {checkpoint.down_projections[layer].name: layer for layer in layers}
    before, after = tensor_bytes_on_disk(source), tensor_bytes_on_disk(out)
    assert before.keys() == after.keys()
    exposure = read_artifact(accessor, ACCESSOR_FORMAT)
    for name in before:
        if name in edited:
            original = load_tensor(source, name)
            gate = gates(exposure.layer_tensor(edited[name], "exposure"), gamma)
            expected = (original.float() * gate[None, :]).to(original.dtype)  # columns scaled
            assert torch.equal(load_tensor(out, name), expected), name
            assert before[name] != after[name]
        else:
            assert before[name] == after[name], name
    # Layers outside the range and the vision tower are untouched; so is every shard header.
    for layer in (0, 3):
        name = checkpoint.down_projections[layer].name
        assert before[name] == after[name]
    assert any(name.startswith(("vision_tower.", "visual.")) for name in before)
    for shard in checkpoint.shards:
        assert read_safetensors_header(source / shard) == read_safetensors_header(out / shard)

    # Every other file is carried over byte for byte; the manifest and the card are the only new ones.
    source_files = {path.name for path in source.iterdir()}
    out_files = {path.name for path in out.iterdir()}
    assert out_files == source_files | {MANIFEST_FILE, "README.md"}
    for name in source_files - set(checkpoint.shards):
        assert (source / name).read_bytes() == (out / name).read_bytes(), name

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["gamma"] == gamma and manifest["layers"] == layers and manifest["mode"] == "one-shot"
    assert manifest["input_model"]["fingerprint"] == checkpoint.fingerprint()
    assert manifest["accessor"]["sha256"] == file_sha256(accessor)
    assert manifest["shards"] == {shard: file_sha256(out / shard) for shard in checkpoint.shards}
    assert manifest["output_fingerprint"] == open_checkpoint(resolve_model(str(out))).fingerprint()
    layer_one = manifest["per_layer"]["1"]
    gate_one = gates(exposure.layer_tensor(1, "exposure"), gamma)
    assert layer_one["scaled"] == int((gate_one < 1).sum())
    assert layer_one["min_gate"] == pytest.approx(float(gate_one.min()))

    # The typed manifest is what the file holds, byte for byte.
    assert (out / MANIFEST_FILE).read_text() == json.dumps(result.manifest.to_json(), indent=2) + "\n"
    assert result.manifest.layers == layers and result.manifest.mode == "one-shot"
    assert list(result.manifest.per_layer) == layers
    assert result.manifest.per_layer[1] == LayerEdit(**layer_one)


def test_apply_module_layout(
    module_layout_checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    # The module-layout checkpoint holds the same weights, so the Hub-layout accessor fits it.
    source = module_layout_checkpoints["llava"]
    out = run_apply(
        ModelSpec(str(source)), pipelines["llava"]["accessor"], tmp_path / "out", ApplyOptions(gamma=0.5, layers="0")
    ).path
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(load_tensor(source, name), load_tensor(out, name))
    other = "model.language_model.layers.1.mlp.down_proj.weight"
    assert torch.equal(load_tensor(source, other), load_tensor(out, other))


def test_bfloat16_checkpoint_is_rounded_once(
    checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], dtype=torch.bfloat16)
    source = tmp_path / "bf16"
    model.save_pretrained(source, max_shard_size="40KB")
    transformers.AutoTokenizer.from_pretrained(checkpoints["qwen2"]).save_pretrained(source)
    # The bf16 copy has another fingerprint: make an accessor for it from the same profiles' math.
    accessor = read_artifact(pipelines["qwen2"]["accessor"], ACCESSOR_FORMAT)
    from kvwctl.artifacts import write_artifact

    metadata = dict(accessor.metadata, model_fingerprint=open_checkpoint(resolve_model(str(source))).fingerprint())
    write_artifact(tmp_path / "a.safetensors", accessor.tensors, metadata)
    out = run_apply(
        ModelSpec(str(source)), tmp_path / "a.safetensors", tmp_path / "out", ApplyOptions(gamma=1.0, layers="2")
    ).path
    name = "model.layers.2.mlp.down_proj.weight"
    original = load_tensor(source, name)
    assert original.dtype == torch.bfloat16
    gate = gates(accessor.layer_tensor(2, "exposure"), 1.0)
    assert torch.equal(load_tensor(out, name), (original.float() * gate).to(torch.bfloat16))


def generate(checkpoint: Path, model_type: str, image: Path | None) -> torch.Tensor:
    if model_type in MULTIMODAL:
        assert image is not None
        processor = transformers.AutoProcessor.from_pretrained(checkpoint)
        model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this person?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[load_image(image)], return_tensors="pt")
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Who is Mira Okafor?"}], add_generation_prompt=True, tokenize=False
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        tokens: torch.Tensor = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return tokens


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "qwen2"])
@pytest.mark.parametrize("mode", ["one-shot", "progressive"])
def test_output_loads_and_generates(
    model_type: str,
    mode: str,
    checkpoints: dict[str, Path],
    pipelines: dict[str, dict[str, Path]],
    data: dict[str, Path],
    tmp_path: Path,
) -> None:
    source = checkpoints[model_type]
    if mode == "one-shot":
        out = run_apply(
            ModelSpec(str(source)),
            pipelines[model_type]["accessor"],
            tmp_path / "out",
            ApplyOptions(gamma=0.5, layers="1:3"),
        ).path
    else:
        out = run_progressive(
            ModelSpec(str(source)),
            split_for(model_type, data, "forget"),
            pipelines[model_type]["retain"],
            tmp_path / "out",
            ApplyOptions(gamma=0.5, layers="1:3"),
        ).path
    image = data["forget"].parent / "images" / "p0.png"
    tokens = generate(out, model_type, image)
    assert tokens.shape[1] > 0
    # transformers reads the edited weights back as they were written.
    model_class = (
        transformers.AutoModelForImageTextToText if model_type in MULTIMODAL else transformers.AutoModelForCausalLM
    )
    reloaded = model_class.from_pretrained(out)
    layers = reloaded.model.language_model.layers if model_type in MULTIMODAL else reloaded.model.layers
    checkpoint = open_checkpoint(resolve_model(str(out)))
    assert torch.equal(layers[2].mlp.down_proj.weight, load_tensor(out, checkpoint.down_projections[2].name))


def progressive(
    model_type: str,
    checkpoints: dict[str, Path],
    pipelines: dict[str, dict[str, Path]],
    data: dict[str, Path],
    out: Path,
    *,
    gamma: float,
    layers: str,
) -> tuple[ApplyResult, Artifact]:
    """A progressive run on the fixture data; returns its result and the exposure it applied."""
    result = run_progressive(
        ModelSpec(str(checkpoints[model_type])),
        data["forget"],
        pipelines[model_type]["retain"],
        out,
        ApplyOptions(gamma=gamma, layers=layers),
    )
    return result, read_artifact(out.parent / f"{out.name}.exposure.safetensors", ACCESSOR_FORMAT)


def assert_same_exposure(first: Artifact, second: Artifact, layers: Iterable[int]) -> None:
    for layer in layers:
        torch.testing.assert_close(
            first.layer_tensor(layer, "exposure"), second.layer_tensor(layer, "exposure"), rtol=1e-6, atol=0
        )


def test_progressive_equals_one_shot_when_gamma_is_zero(
    checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], data: dict[str, Path], tmp_path: Path
) -> None:
    result, applied = progressive("llava", checkpoints, pipelines, data, tmp_path / "p", gamma=0.0, layers=":")
    assert applied.metadata["mode"] == "progressive"
    assert_same_exposure(applied, read_artifact(pipelines["llava"]["accessor"], ACCESSOR_FORMAT), range(4))
    # gamma = 0 leaves every weight as it was.
    assert tensor_bytes_on_disk(checkpoints["llava"]) == tensor_bytes_on_disk(result.path)
    assert result.manifest.mode == "progressive"


def test_progressive_equals_one_shot_on_a_single_layer(
    checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], data: dict[str, Path], tmp_path: Path
) -> None:
    # Weakening layer 2 cannot change its own input, nor the layers before it: no feedback.
    source = checkpoints["qwen2_vl"]
    result, applied = progressive("qwen2_vl", checkpoints, pipelines, data, tmp_path / "p", gamma=2.0, layers="2")
    one_shot = run_apply(
        ModelSpec(str(source)), pipelines["qwen2_vl"]["accessor"], tmp_path / "o", ApplyOptions(gamma=2.0, layers="2")
    ).path
    accessor = read_artifact(pipelines["qwen2_vl"]["accessor"], ACCESSOR_FORMAT)
    assert_same_exposure(applied, accessor, (0, 1, 2))  # up to the edited layer the model is the original
    name = open_checkpoint(resolve_model(str(source))).down_projections[2].name
    torch.testing.assert_close(load_tensor(result.path, name), load_tensor(one_shot, name), rtol=1e-6, atol=0)
    assert json.loads(applied.metadata["applied_layers"]) == [2]


def test_progressive_feedback_changes_later_layers(
    checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], data: dict[str, Path], tmp_path: Path
) -> None:
    _, applied = progressive("qwen2_vl", checkpoints, pipelines, data, tmp_path / "p", gamma=5.0, layers="0:3")
    accessor = read_artifact(pipelines["qwen2_vl"]["accessor"], ACCESSOR_FORMAT)
    # Nothing before layer 0 is edited, so its coefficients never move; layer 3's do once the
    # layers before it are weakened.
    assert_same_exposure(applied, accessor, (0,))
    assert not torch.allclose(applied.layer_tensor(3, "exposure"), accessor.layer_tensor(3, "exposure"))


def test_progressive_exposure_file_reproduces_the_progressive_checkpoint(
    checkpoints: dict[str, Path], pipelines: dict[str, dict[str, Path]], data: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints["llava"]
    result, _ = progressive("llava", checkpoints, pipelines, data, tmp_path / "p", gamma=1.5, layers="0:3")
    replayed = run_apply(
        ModelSpec(str(source)),
        tmp_path / "p.exposure.safetensors",
        tmp_path / "r",
        ApplyOptions(gamma=1.5, layers="0:3"),
    ).path
    for shard in open_checkpoint(resolve_model(str(source))).shards:
        assert (result.path / shard).read_bytes() == (replayed / shard).read_bytes(), shard
    assert tensor_bytes_on_disk(result.path) != tensor_bytes_on_disk(source)
