"""Profile coefficients against an independent computation, positions, batching, BOS and BPE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from helpers import MULTIMODAL, copy_checkpoint, split_for

from kvwctl.artifacts import PROFILE_FORMAT, read_artifact
from kvwctl.checkpoint import open_checkpoint
from kvwctl.conversation import ChatRenderer
from kvwctl.data import Sample, load_image, load_samples
from kvwctl.modeling import LoadedModel, encode_batch, load_model
from kvwctl.options import ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.testing import LLAVA_TEMPLATE, MISTRAL_TEMPLATE, byte_level_tokenizer, sentencepiece_tokenizer


def independent_sums(checkpoint: Path, samples: list[Sample], mode: str) -> tuple[list[torch.Tensor], list[int]]:
    """Per-sample sums of |act(gate(h)) * up(h)| per layer, one unpadded sample at a time.

    Positions come from tokenizing prefixes of the rendered text (up to the answer, up to its end),
    not from offsets: the fixtures' tokenizers split stably at these word boundaries.
    """
    loaded = load_model(
        open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32
    )
    model, renderer = loaded.model, loaded.renderer
    multimodal = renderer.multimodal
    layers = model.model.language_model.layers if multimodal else model.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda module, args, output, index=index: captured.__setitem__(index, args[0]))
        for index, layer in enumerate(layers)
    ]
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    counts = []
    tokenizer = renderer.tokenizer
    for sample in samples:
        full = renderer.render(sample).text
        special = renderer.add_special_tokens(full)
        answer_char = full.index(sample.answer, len(renderer.prompt_text(sample)))
        # Both fixture tokenizers merge a space into the word after it.
        before = len(tokenizer(full[:answer_char].rstrip(" "), add_special_tokens=special)["input_ids"])
        through = len(tokenizer(full[: answer_char + len(sample.answer)], add_special_tokens=special)["input_ids"])
        plain_ids = tokenizer(full, add_special_tokens=special)["input_ids"]
        kwargs = {"images": [load_image(path) for path in sample.images]} if sample.images else {}
        inputs = renderer.processor(text=[full], return_tensors="pt", add_special_tokens=special, **kwargs)
        length = inputs["input_ids"].shape[1]
        expansion = length - len(plain_ids)  # image tokens added by the processor
        start, answer_length = expansion + before, through - before  # first answer token, answer tokens
        positions = {
            "answer": list(range(start - 1, start + answer_length - 1)),
            "answer-tokens": list(range(start, start + answer_length)),
            "all": list(range(length)),
        }[mode]
        with torch.inference_mode():
            model(**inputs)
            for index, layer in enumerate(layers):
                hidden = captured[index][0]  # (sequence, d_model)
                mlp = layer.mlp
                activations = mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden)  # (sequence, m)
                per_layer[index].append(activations[positions].abs().double().sum(dim=0))
        counts.append(len(positions))
    for hook in hooks:
        hook.remove()
    return [torch.stack(sums) for sums in per_layer], counts


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "qwen2_5_vl", "llama", "qwen2", "mistral"])
def test_forget_profile_matches_independent_hooks(
    model_type: str, checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    split = split_for(model_type, data, "forget")
    out = run_profile(
        ModelSpec(str(checkpoints[model_type])),
        split,
        tmp_path / "f.safetensors",
        ProfileOptions(split="forget", batch_size=3),
    )
    profile = read_artifact(out.path, PROFILE_FORMAT)
    expected_sums, expected_counts = independent_sums(checkpoints[model_type], load_samples(split), "answer")
    assert profile.tensors["count"].tolist() == expected_counts
    for layer, expected in enumerate(expected_sums):
        torch.testing.assert_close(profile.layer_tensor(layer, "sum"), expected, rtol=1e-5, atol=1e-7)
    assert profile.metadata["split"] == "forget"
    assert profile.metadata["num_positions"] == str(sum(expected_counts))


@pytest.mark.parametrize("mode", ["answer", "answer-tokens", "all"])
def test_position_modes(mode: str, checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path) -> None:
    out = run_profile(
        ModelSpec(str(checkpoints["llava"])),
        data["forget"],
        tmp_path / "f.safetensors",
        ProfileOptions(split="forget", positions=mode),
    )
    profile = read_artifact(out.path, PROFILE_FORMAT)
    expected_sums, expected_counts = independent_sums(checkpoints["llava"], load_samples(data["forget"]), mode)
    assert profile.tensors["count"].tolist() == expected_counts
    assert profile.metadata["positions"] == mode
    for layer, expected in enumerate(expected_sums):
        torch.testing.assert_close(profile.layer_tensor(layer, "sum"), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_batching_and_padding_do_not_change_sums(
    model_type: str, checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    # Five samples of different lengths, with and without images: batch size 4 pads heavily.
    single = run_profile(
        ModelSpec(str(checkpoints[model_type])),
        data["forget"],
        tmp_path / "1.safetensors",
        ProfileOptions(split="forget", batch_size=1),
    )
    batched = run_profile(
        ModelSpec(str(checkpoints[model_type])),
        data["forget"],
        tmp_path / "4.safetensors",
        ProfileOptions(split="forget", batch_size=4),
    )
    one, four = read_artifact(single.path, PROFILE_FORMAT), read_artifact(batched.path, PROFILE_FORMAT)
    assert torch.equal(one.tensors["count"], four.tensors["count"])
    for layer in range(one.num_layers):
        torch.testing.assert_close(
            one.layer_tensor(layer, "sum"), four.layer_tensor(layer, "sum"), rtol=1e-5, atol=1e-7
        )


def test_retain_profile_pools_sums_and_counts(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    forget_style = run_profile(
        ModelSpec(str(checkpoints["qwen2"])),
        data["retain-text"],
        tmp_path / "f.safetensors",
        ProfileOptions(split="forget"),
    )
    retain_style = run_profile(
        ModelSpec(str(checkpoints["qwen2"])),
        data["retain-text"],
        tmp_path / "r.safetensors",
        ProfileOptions(split="retain"),
    )
    per_sample, pooled = (
        read_artifact(forget_style.path, PROFILE_FORMAT),
        read_artifact(retain_style.path, PROFILE_FORMAT),
    )
    assert pooled.tensors["count"].shape == ()
    assert pooled.tensors["count"].item() == per_sample.tensors["count"].sum().item()
    for layer in range(pooled.num_layers):
        assert pooled.layer_tensor(layer, "sum").dtype == torch.float64
        torch.testing.assert_close(pooled.layer_tensor(layer, "sum"), per_sample.layer_tensor(layer, "sum").sum(dim=0))


def test_tokenizer_without_pad_token_still_batches(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    import json

    model = copy_checkpoint(checkpoints["qwen2"], tmp_path / "m")
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = None
    config_path.write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(model).pad_token is None
    padded = run_profile(
        ModelSpec(str(model)),
        data["retain-text"],
        tmp_path / "a.safetensors",
        ProfileOptions(split="forget", batch_size=4),
    )
    reference = run_profile(
        ModelSpec(str(checkpoints["qwen2"])),
        data["retain-text"],
        tmp_path / "b.safetensors",
        ProfileOptions(split="forget", batch_size=1),
    )
    first, second = read_artifact(padded.path, PROFILE_FORMAT), read_artifact(reference.path, PROFILE_FORMAT)
    for layer in range(first.num_layers):
        torch.testing.assert_close(
            first.layer_tensor(layer, "sum"), second.layer_tensor(layer, "sum"), rtol=1e-5, atol=1e-7
        )


def test_profile_metadata_records_how_it_was_made(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    result = run_profile(
        ModelSpec(str(checkpoints["llava"])), data["retain"], tmp_path / "r.safetensors", ProfileOptions(split="retain")
    )
    metadata = read_artifact(result.path, PROFILE_FORMAT).metadata
    checkpoint = open_checkpoint(resolve_model(str(checkpoints["llava"])))
    assert metadata["format"] == "kvwctl.profile/2"
    assert metadata["model_fingerprint"] == checkpoint.fingerprint() == result.fingerprint
    assert metadata["model_type"] == "llava"
    assert metadata["num_samples"] == "8"
    assert metadata["positions"] == "answer"
    assert metadata["accumulation_dtype"] == "float64"
    assert len(metadata["data_sha256"]) == 64
    assert "created" not in metadata  # stage files carry no creation time: reproducible bytes


# --- the sequence the model sees --------------------------------------------------------------------


def _loaded(checkpoints: dict[str, Path], model_type: str) -> LoadedModel:
    return load_model(
        open_checkpoint(resolve_model(str(checkpoints[model_type]))), device=torch.device("cpu"), dtype=torch.float32
    )


@pytest.mark.parametrize("model_type", ["llava", "llama", "mistral", "qwen2_vl"])
def test_exactly_one_bos(model_type: str, checkpoints: dict[str, Path], data: dict[str, Path]) -> None:
    loaded = _loaded(checkpoints, model_type)
    renderer = loaded.renderer
    samples = load_samples(split_for(model_type, data, "forget"))
    rendered = [renderer.render(sample) for sample in samples]
    input_ids = encode_batch(loaded, rendered, positions="answer").inputs["input_ids"]
    bos = renderer.tokenizer.bos_token_id
    if model_type == "qwen2_vl":
        assert bos is None  # ChatML models use no BOS at all
        return
    assert (input_ids[:, 0] == bos).all()
    assert (input_ids[:, 1] != bos).all()
    # The trap: the template of llama/mistral writes BOS and the tokenizer adds another.
    blind = renderer.tokenizer(rendered[0].text)["input_ids"][:2]
    assert (blind == [bos, bos]) == (model_type in ("llama", "mistral"))
    # LLaVA-1.5's template writes none; tokenizing without special tokens would give no BOS.
    if model_type == "llava":
        assert not rendered[0].text.startswith("<s>")
        assert renderer.tokenizer(rendered[0].text, add_special_tokens=False)["input_ids"][0] != bos


def test_bpe_answer_tokens_differ_in_conversation_but_are_located() -> None:
    # Byte-level BPE behind a template that puts a space before the answer: " Mira" is one token
    # inside the conversation, "Mira" alone is another.
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = MISTRAL_TEMPLATE.replace("{{ bos_token }}", "")
    renderer = ChatRenderer(tokenizer, multimodal=False)
    sample = Sample(id="bpe", question="Who is this person?", answer="Mira Okafor", source="test:1")
    rendered = renderer.render(sample)
    answer_ids = list(rendered.token_ids[rendered.answer_start : rendered.answer_start + rendered.answer_length])
    alone = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
    assert answer_ids != alone
    assert tokenizer.decode(answer_ids) == " Mira Okafor"
    assert tokenizer.decode(list(rendered.token_ids[: rendered.answer_start])).endswith("[/INST]")


def test_answer_is_located_in_the_assistant_turn_not_at_its_first_match() -> None:
    tokenizer = sentencepiece_tokenizer()
    processor_like = tokenizer
    tokenizer.chat_template = MISTRAL_TEMPLATE
    renderer = ChatRenderer(processor_like, multimodal=False)
    # The answer text also occurs in the question.
    sample = Sample(id="echo", question="Is it Paris or Lima? Paris", answer="Paris", source="test:1")
    rendered = renderer.render(sample)
    prompt_length = len(tokenizer(renderer.prompt_text(sample), add_special_tokens=False)["input_ids"])
    assert rendered.answer_start == prompt_length
    assert tokenizer.decode(list(rendered.token_ids[rendered.answer_start :])).startswith("Paris")


def test_multimodal_content_is_a_list_of_parts_and_text_only_a_string() -> None:
    tokenizer = sentencepiece_tokenizer()
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(),
        tokenizer=tokenizer,
        patch_size=14,
        chat_template=LLAVA_TEMPLATE,
    )
    sample = Sample(id="x", question="Who?", answer="Ade", images=(Path("a.png"),))
    messages = ChatRenderer(processor, multimodal=True).messages(sample, with_answer=True)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Who?"}]
    assert messages[1]["content"] == [{"type": "text", "text": "Ade"}]
    tokenizer.chat_template = MISTRAL_TEMPLATE
    text_only = ChatRenderer(tokenizer, multimodal=False).messages(
        Sample(id="y", question="Who?", answer="Ade"), with_answer=True
    )
    assert text_only == [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ade"}]


def test_module_layout_gives_the_same_profile(
    checkpoints: dict[str, Path], module_layout_checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    for model_type in MULTIMODAL:
        hub = run_profile(
            ModelSpec(str(checkpoints[model_type])),
            data["forget"],
            tmp_path / f"{model_type}-h.safetensors",
            ProfileOptions(split="forget"),
        )
        module = run_profile(
            ModelSpec(str(module_layout_checkpoints[model_type])),
            data["forget"],
            tmp_path / f"{model_type}-m.safetensors",
            ProfileOptions(split="forget"),
        )
        assert hub.fingerprint == module.fingerprint  # names are not hashed, weights are
        first, second = read_artifact(hub.path, PROFILE_FORMAT), read_artifact(module.path, PROFILE_FORMAT)
        for layer in range(first.num_layers):
            assert torch.equal(first.layer_tensor(layer, "sum"), second.layer_tensor(layer, "sum"))
