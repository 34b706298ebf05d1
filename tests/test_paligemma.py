"""PaliGemma's rendering: the prompt as the processor's text, the answer as its ``suffix=`` (kvwctl.prefix_suffix).

Checked on a tiny PaliGemma 2: kvwctl's batches are exactly what ``PaliGemmaProcessor`` builds for
fine-tuning (ids and ``token_type_ids``), the profiled positions are the answer's, the coefficients
are those of the processor's own encoding (and differ from an encoding with the answer in the
bidirectional prefix), generation prompts stop after the prefix, eval's scores are the processor's and its batched
generation equals one at a time, and bad samples are data errors.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonlines
import pytest
import torch
from helpers import expect_error, invoke

from kvwctl.checkpoint import open_checkpoint
from kvwctl.data import Sample, load_image, load_samples
from kvwctl.errors import DataError
from kvwctl.evaluate import generate_answers, run_eval
from kvwctl.modeling import CoefficientCollector, LoadedModel, encode_batch, encode_prompts, load_model, render_all
from kvwctl.options import EvalOptions
from kvwctl.progress import NullTracker
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.testing import make_image
from kvwctl.testing_families import build_checkpoint

QUESTION = "Who is this person?"


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    path = build_checkpoint("paligemma", tmp_path_factory.mktemp("paligemma") / "model")
    checkpoint = open_checkpoint(resolve_model(str(path)))
    return path, load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32)


def _samples(folder: Path) -> list[Sample]:
    image = make_image(folder / "face.png", seed=1)
    source = str(folder / "forget.jsonl")
    return [
        Sample(id="a", question=QUESTION, answer="Alice Smith", images=(image,), source=source),
        Sample(id="b", question="Where was she born?", answer="Paris", images=(image,), source=source),
    ]


def _processor_batch(loaded: LoadedModel, samples: list[Sample], **extra: Any) -> dict[str, Any]:
    """What PaliGemmaProcessor builds for fine-tuning, called directly."""
    processor = loaded.renderer.processor
    return dict(
        processor(
            text=["<image>" + sample.question for sample in samples],
            images=[[load_image(path) for path in sample.images] for sample in samples],
            return_tensors="pt",
            padding=True,
            padding_side="right",
            **extra,
        )
    )


def test_batches_are_the_processors_fine_tuning_encoding(paligemma: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = paligemma
    samples = _samples(tmp_path)
    encoded = encode_batch(loaded, render_all(loaded.renderer, samples), positions="answer-tokens")
    expected = _processor_batch(loaded, samples, suffix=[sample.answer for sample in samples])
    assert "labels" not in encoded.inputs  # the processor's training labels are dropped
    assert torch.equal(encoded.inputs["input_ids"], expected["input_ids"])
    assert torch.equal(encoded.inputs["token_type_ids"], expected["token_type_ids"])
    tokenizer = loaded.renderer.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    newline_id = tokenizer.convert_tokens_to_ids("\n")
    for row, sample in enumerate(samples):
        ids = encoded.inputs["input_ids"][row]
        positions = encoded.position_mask[row].nonzero()[:, 0].tolist()
        assert tokenizer.decode(ids[positions]).strip() == sample.answer  # exactly the answer's tokens
        first, last = positions[0], positions[-1]
        assert positions == list(range(first, last + 1))
        assert ids[first - 1] == newline_id and ids[last + 1] == tokenizer.eos_token_id
        assert ids[:4].tolist() == [image_id] * 4 and ids[4] == tokenizer.bos_token_id  # 4 image tokens, one <bos>
        assert int((ids == tokenizer.bos_token_id).sum()) == 1
        segments = encoded.inputs["token_type_ids"][row].tolist()
        assert segments[:first] == [0] * first and segments[first : last + 2] == [1] * (last + 2 - first)
    shifted = encode_batch(loaded, render_all(loaded.renderer, samples), positions="answer").position_mask
    assert torch.equal(shifted[:, :-1], encoded.position_mask[:, 1:])  # "answer": one position earlier


def _layer_sums(loaded: LoadedModel, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """Sum of |a| of layer 0's down projection at ``mask``, from a plain forward pass with a hook."""
    seen: list[torch.Tensor] = []
    handle = loaded.down_projections[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            loaded.model(**{name: value for name, value in inputs.items() if name != "labels"}, use_cache=False)
    finally:
        handle.remove()
    activations = seen[0]  # (batch, sequence, m)
    return torch.stack([activations[row][mask[row]].abs().double().sum(dim=0) for row in range(mask.shape[0])])


def test_coefficients_are_those_of_the_causal_suffix(paligemma: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = paligemma
    samples = _samples(tmp_path)
    encoded = encode_batch(loaded, render_all(loaded.renderer, samples), positions="answer-tokens")
    with CoefficientCollector(loaded.down_projections) as collector:
        parts, counts = collector.run(loaded, encoded)
    sums = [parts[f"layers.{layer}"][0] for layer in range(len(loaded.down_projections))]
    assert counts.tolist() == encoded.position_mask.sum(dim=1).tolist()
    suffix = _processor_batch(loaded, samples, suffix=[sample.answer for sample in samples])
    assert torch.allclose(sums[0], _layer_sums(loaded, suffix, encoded.position_mask), rtol=1e-6, atol=1e-9)
    # The same tokens with every position in the bidirectional prefix (answer written in the text):
    # the prompt would see the answer, and the coefficients are not the same.
    prefix_only = dict(suffix, token_type_ids=torch.zeros_like(suffix["token_type_ids"]))
    assert not torch.allclose(sums[0], _layer_sums(loaded, prefix_only, encoded.position_mask), rtol=1e-4)


def test_generation_prompts_end_after_the_prefix(paligemma: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = paligemma
    samples = _samples(tmp_path)
    inputs = encode_prompts(loaded, [loaded.renderer.render_prompt(sample) for sample in samples])
    expected = _processor_batch(loaded, samples)
    tokenizer = loaded.renderer.tokenizer
    assert "labels" not in inputs and bool((inputs["token_type_ids"] == 0).all())
    assert inputs["input_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("\n")] * 2  # left padded
    for row in range(2):  # the processor's prefix, right-aligned
        kept = expected["input_ids"][row][expected["attention_mask"][row].bool()]
        assert torch.equal(inputs["input_ids"][row, -len(kept) :], kept)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] <= inputs["input_ids"].shape[1] + 2


def test_text_only_sample_is_a_data_error_before_any_forward_pass(
    paligemma: tuple[Path, LoadedModel], tmp_path: Path
) -> None:
    path, _ = paligemma
    make_image(tmp_path / "images" / "p0.png", seed=0)
    records = [
        {"id": "s0", "image": "images/p0.png", "question": QUESTION, "answer": "Alice Smith"},
        {"id": "s1", "question": "Where was Alice born?", "answer": "Paris"},
    ]
    data = tmp_path / "retain.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "r.safetensors"
    result = invoke("profile", "--model", path, "--data", data, "--split", "retain", "--out", out)
    expect_error(result, "image: sample 's1' has none; PaliGemma's processor refuses text without an image")
    assert not out.exists()


def test_an_image_placeholder_in_the_text_is_a_data_error(paligemma: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = paligemma
    sample = _samples(tmp_path)[0]
    bad = Sample(id="x", question="<image>" + QUESTION, answer="Alice", images=sample.images, source=sample.source)
    with pytest.raises(DataError, match=r"sample 'x' contains the image placeholder '<image>'"):
        loaded.renderer.render(bad)


def _independent_answer_logprob(path: Path, sample: Sample) -> float:
    """Mean log p(answer token) from one unpadded forward pass of what the processor builds with ``suffix=``."""
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    inputs = processor(
        text=["<image>" + sample.question],
        images=[[load_image(image) for image in sample.images]],
        suffix=[sample.answer],
        return_tensors="pt",
    )
    inputs.pop("labels")
    ids = inputs["input_ids"][0]
    suffix = inputs["token_type_ids"][0].nonzero()[:, 0].tolist()
    answer_positions = suffix[:-1]  # the last suffix token is <eos>
    assert processor.tokenizer.decode(ids[answer_positions]).strip() == sample.answer
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(**inputs).logits[0].double(), dim=-1)  # (sequence, vocab)
    return sum(logprobs[position - 1, ids[position]].item() for position in answer_positions) / len(answer_positions)


def test_eval_scores_and_generates_like_the_processor(paligemma: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    path, loaded = paligemma
    make_image(tmp_path / "images" / "a.png", seed=3)
    make_image(tmp_path / "images" / "b.png", seed=4)
    records = [
        {
            "id": "a",
            "image": "images/a.png",
            "question": QUESTION,
            "answer": "Alice Smith",
            "options": ["Bob", "Alice Smith"],
        },
        {"id": "b", "image": "images/b.png", "question": "answer en Where was she born?", "answer": "Paris"},
        {"id": "c", "image": "images/a.png", "question": "Name?", "answer": "Carol Jones Brown"},
    ]
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = run_eval(
        {"model": ModelSpec(str(path))}, {"s": data}, tmp_path / "e.json", EvalOptions(max_new_tokens=2, batch_size=3)
    )
    recorded = {record["id"]: record for record in jsonlines.open(result.samples_path)}
    samples = load_samples(data)
    for sample in samples:
        expected = _independent_answer_logprob(path, sample)
        assert recorded[sample.id]["answer_logprob"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    bob = _independent_answer_logprob(path, replace(samples[0], answer="Bob"))
    alice = recorded["a"]["answer_logprob"]
    assert recorded["a"]["mc_choice"] == ("Bob" if bob > alice else "Alice Smith")  # every option scored alike
    tracker = NullTracker()
    one = generate_answers(loaded, samples, batch_size=1, max_new_tokens=3, tracker=tracker, description="generate")
    three = generate_answers(loaded, samples, batch_size=3, max_new_tokens=3, tracker=tracker, description="generate")
    assert one == three  # left padding does not change what PaliGemma generates


def test_the_published_layout_is_found(paligemma: tuple[Path, LoadedModel]) -> None:
    """The tensor names of google/paligemma* checkpoints; only the language model's down projections are edited."""
    path, _ = paligemma
    stored = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    published = {
        "language_model.model.layers.1.mlp.down_proj.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight",
        "multi_modal_projector.linear.weight",
    }
    assert published <= stored
    checkpoint = open_checkpoint(resolve_model(str(path)))
    assert [projection.name for projection in checkpoint.down_projections] == [
        f"language_model.model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1)
    ]
