"""The registry as data: published weight names match, vision towers never do; ``kvwctl architectures``;
an unsupported model_type fails before any work, with the supported list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import expect_error, invoke

from kvwctl.architectures import REGISTRY, context_length, num_decoder_layers
from kvwctl.files import save_safetensors_atomically
from kvwctl.testing import write_samples
from kvwctl.testing_families import build_checkpoint

# model_type -> (names of layer 3's down projection in published checkpoints, names that must not match)
PUBLISHED = {
    "qwen3_vl": (
        ["model.language_model.layers.3.mlp.down_proj.weight"],
        ["model.visual.blocks.3.mlp.linear_fc2.weight", "model.layers.3.mlp.down_proj.weight"],
    ),
    "gemma3": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],
        ["vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight"],
    ),
    "idefics3": (
        ["model.text_model.layers.3.mlp.down_proj.weight"],
        ["model.vision_model.encoder.layers.3.mlp.fc2.weight"],
    ),
    "smolvlm": (
        ["model.text_model.layers.3.mlp.down_proj.weight"],
        ["model.vision_model.encoder.layers.3.mlp.fc2.weight"],
    ),
    "llava_next": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],
        ["vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight", "image_newline"],
    ),
    "llava_onevision": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],
        ["vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight"],
    ),
    "internvl": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],
        ["vision_tower.encoder.layer.3.mlp.fc2.weight"],
    ),
    "mllama": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],  # layer 3 is a cross-attention layer
        ["vision_model.transformer.layers.3.mlp.fc2.weight", "vision_model.global_transformer.layers.3.mlp.fc2.weight"],
    ),
    "mistral3": (
        ["language_model.model.layers.3.mlp.down_proj.weight"],
        ["vision_tower.transformer.layers.3.feed_forward.down_proj.weight"],
    ),
    "qwen3": (["model.layers.3.mlp.down_proj.weight"], ["model.layers.3.mlp.up_proj.weight"]),
    "gemma2": (["model.layers.3.mlp.down_proj.weight"], []),
    "gemma3_text": (["model.layers.3.mlp.down_proj.weight"], []),
    "phi3": (["model.layers.3.mlp.down_proj.weight"], ["model.layers.3.mlp.gate_up_proj.weight"]),
    "olmo2": (["model.layers.3.mlp.down_proj.weight"], []),
    "gpt2": (
        ["h.3.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"],
        ["h.3.attn.c_proj.weight", "h.3.mlp.c_fc.weight", "h.3.mlp.c_proj.bias"],
    ),
    "gpt_neox": (
        ["gpt_neox.layers.3.mlp.dense_4h_to_h.weight"],
        ["gpt_neox.layers.3.mlp.dense_h_to_4h.weight", "gpt_neox.layers.3.attention.dense.weight"],
    ),
}


@pytest.mark.parametrize("model_type", sorted(PUBLISHED))
def test_published_names_match_and_vision_towers_do_not(model_type: str) -> None:
    architecture = REGISTRY[model_type]
    matching, others = PUBLISHED[model_type]
    assert [architecture.disk_layer(name) for name in matching] == [3] * len(matching)
    assert [architecture.disk_layer(name) for name in others] == [None] * len(others)


def test_gpt2_vectors_are_rows_and_its_config_keys_are_read() -> None:
    assert REGISTRY["gpt2"].vector_axis == 0
    assert {REGISTRY[name].vector_axis for name in REGISTRY if name != "gpt2"} == {1}
    config = {"model_type": "gpt2", "n_layer": 12, "n_positions": 1024, "n_embd": 768}
    assert num_decoder_layers(config) == 12
    assert context_length(config) == 1024


def test_architectures_lists_every_model_type() -> None:
    result = invoke("architectures")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(REGISTRY)
    by_type = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert by_type["gpt2"] == [
        "gpt2",
        "text",
        "transformer.h.N.mlp.c_proj",
        "h.N.mlp.c_proj.weight | transformer.h.N.mlp.c_proj.weight",
        "rows (0)",
    ]
    assert by_type["qwen3_vl"] == [
        "qwen3_vl",
        "image+text",
        "model.language_model.layers.N.mlp.down_proj",
        "model.language_model.layers.N.mlp.down_proj.weight",
        "columns (1)",
    ]
    assert "model_type" in result.stderr and "model_type" not in result.stdout


def test_architectures_json() -> None:
    result = invoke("architectures", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [entry["model_type"] for entry in listed] == sorted(REGISTRY)
    mllama = next(entry for entry in listed if entry["model_type"] == "mllama")
    assert mllama == {
        "model_type": "mllama",
        "multimodal": True,
        "auto_class": "AutoModelForImageTextToText",
        "module_path": "model.language_model.layers.N.mlp.down_proj",
        "disk_layouts": [
            "language_model.model.layers.N.mlp.down_proj.weight",
            "model.language_model.layers.N.mlp.down_proj.weight",
        ],
        "disk_patterns": list(REGISTRY["mllama"].disk_patterns),
        "vector_axis": 1,
        "published": "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "image_required": True,
    }


def test_unsupported_model_type_fails_before_any_work_with_the_list(tmp_path: Path) -> None:
    import torch

    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    save_safetensors_atomically(
        {"encoder.layer.0.output.dense.weight": torch.zeros(2, 2)}, model / "model.safetensors", {"format": "pt"}
    )
    data = write_samples(tmp_path / "retain.jsonl", count=2, with_images=False)
    out = tmp_path / "r.safetensors"
    result = invoke("profile", "--model", model, "--data", data, "--split", "retain", "--out", out)
    expect_error(result, "unsupported model_type 'bert'")
    shown = " ".join(result.stderr.split())  # as one line, however the console wrapped it
    assert "supported model types: " + ", ".join(sorted(REGISTRY)) + " (kvwctl architectures" in shown
    assert not out.exists()


def test_mllama_refuses_a_sample_without_an_image(tmp_path: Path) -> None:
    model = build_checkpoint("mllama", tmp_path / "mllama")
    data = write_samples(tmp_path / "retain.jsonl", count=2, with_images=True)  # s1 has no image
    out = tmp_path / "r.safetensors"
    result = invoke("profile", "--model", model, "--data", data, "--split", "retain", "--out", out)
    expect_error(result, "image: sample 's1' has none; Mllama runs its cross-attention layers")
    assert not out.exists()


def test_a_skipped_decoder_layer_is_named() -> None:
    import torch

    from kvwctl.errors import ModelError
    from kvwctl.modeling import CoefficientCollector, EncodedBatch

    layers = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]

    class SkipsLayerOne(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
            output: torch.Tensor = layers[0](
                input_ids
            )  # layer 1 never runs (Mllama's cross-attention without an image)
            return output

    class Model:
        base_model = SkipsLayerOne()  # what the collector runs (no head)

    class Loaded:
        model = Model()

    batch = EncodedBatch.of({"input_ids": torch.ones(1, 4, 3)}, torch.ones(1, 4, dtype=torch.bool), torch.device("cpu"))
    with CoefficientCollector(layers) as collector, pytest.raises(ModelError, match=r"decoder layers \[1\]"):
        collector.run(Loaded(), batch)  # type: ignore[arg-type]


def test_a_processor_that_needs_a_missing_package_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SmolVLM's processor without num2words: transformers' ImportError becomes exit 1 naming it."""
    import transformers

    def needs_a_package(*args: object, **kwargs: object) -> None:
        raise ImportError("Package `num2words` is required to run SmolVLM processor.")

    model = build_checkpoint("idefics3", tmp_path / "idefics3")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_a_package)
    data = write_samples(tmp_path / "retain.jsonl", count=2, with_images=True)
    result = invoke("profile", "--model", model, "--data", data, "--split", "retain", "--out", tmp_path / "r")
    expect_error(result, "transformers cannot load the idefics3 processor: Package `num2words` is required")
    assert not (tmp_path / "r").exists()
