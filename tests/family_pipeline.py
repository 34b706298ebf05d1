"""One family end to end on a tiny model in its published on-disk layout (``check_family``).

profile (retain, forget) -> accessor -> apply one-shot and --progressive -> load the outputs with
transformers -> generate. Checked per family: the down projections the registry finds on disk have
the published names (and none is a vision-tower tensor); exactly the edited layer's down projection
changes in each output, under its published name; each output is ``W * exp(-gamma * E)`` along the
registry's vector axis (rows for GPT-2's ``Conv1D``), with ``E`` the accessor's exposure for the
one-shot output and the exposure the progressive run applied for the other; ``kvwctl verify``
recomputes the one-shot edit; both outputs load with their transformers classes and generate.

A plain module (like ``helpers.py``); the ``test_families_*.py`` files parametrize it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from helpers import invoke

from kvwctl.accessor import run_accessor
from kvwctl.apply import run_apply
from kvwctl.architectures import REGISTRY
from kvwctl.artifacts import ACCESSOR_FORMAT, read_artifact
from kvwctl.checkpoint import open_checkpoint
from kvwctl.data import load_image
from kvwctl.method import gates
from kvwctl.options import AccessorOptions, ApplyOptions, ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.progressive import run_progressive
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.testing import write_samples
from kvwctl.testing_families import build_checkpoint

# model_type -> the name of layer 1's down projection in the family's published checkpoints.
PUBLISHED = {
    "qwen3": "model.layers.1.mlp.down_proj.weight",
    "gemma2": "model.layers.1.mlp.down_proj.weight",
    "gemma3_text": "model.layers.1.mlp.down_proj.weight",
    "phi3": "model.layers.1.mlp.down_proj.weight",
    "olmo2": "model.layers.1.mlp.down_proj.weight",
    "gpt2": "h.1.mlp.c_proj.weight",
    "gpt_neox": "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    "qwen3_vl": "model.language_model.layers.1.mlp.down_proj.weight",
    "gemma3": "language_model.model.layers.1.mlp.down_proj.weight",
    "idefics3": "model.text_model.layers.1.mlp.down_proj.weight",
    "smolvlm": "model.text_model.layers.1.mlp.down_proj.weight",
    "llava_next": "language_model.model.layers.1.mlp.down_proj.weight",
    "llava_onevision": "language_model.model.layers.1.mlp.down_proj.weight",
    "internvl": "language_model.model.layers.1.mlp.down_proj.weight",
    "mllama": "language_model.model.layers.1.mlp.down_proj.weight",  # layer 1 is a cross-attention layer
    "mistral3": "language_model.model.layers.1.mlp.down_proj.weight",
    "paligemma": "language_model.model.layers.1.mlp.down_proj.weight",
}
GAMMA = 0.5


def _tensor(checkpoint: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    with safe_open(str(checkpoint / index["weight_map"][name]), framework="pt") as stream:
        tensor: torch.Tensor = stream.get_tensor(name)
    return tensor


def _all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    return {name: _tensor(checkpoint, name) for name in index["weight_map"]}


def _generate(checkpoint: Path, model_type: str, image: Path | None) -> str:
    """Load ``checkpoint`` with its real transformers classes and generate a few tokens."""
    architecture = REGISTRY[model_type]
    model = getattr(transformers, architecture.auto_class).from_pretrained(checkpoint).eval()
    content: object
    if architecture.multimodal:
        processor = transformers.AutoProcessor.from_pretrained(checkpoint)
        content = [{"type": "image"}, {"type": "text", "text": "Who is this person?"}]
    else:
        processor = transformers.AutoTokenizer.from_pretrained(checkpoint)
        content = "Who is this person?"
    if architecture.rendering == "prefix-suffix":  # PaliGemma: no chat template; the processor adds <bos>, "\n"
        text = "<image>Who is this person?"
    else:
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    if architecture.multimodal:
        assert image is not None
        inputs = processor(text=[text], images=[load_image(image)], return_tensors="pt", add_special_tokens=False)
    else:
        inputs = processor([text], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert (
        output.shape[1] == inputs["input_ids"].shape[1] + 3
        or output[0, -1] == model.config.get_text_config().eos_token_id
    )
    decoded: str = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])[0]
    return decoded


def check_family(model_type: str, tmp_path: Path) -> None:
    architecture = REGISTRY[model_type]
    source = build_checkpoint(model_type, tmp_path / "model")
    checkpoint = open_checkpoint(resolve_model(str(source)))
    names = [projection.name for projection in checkpoint.down_projections]
    assert names[1] == PUBLISHED[model_type]  # the published layout, found by the registry
    assert not any("vision" in name or "visual" in name for name in names)

    multimodal = architecture.multimodal
    forget = write_samples(tmp_path / "data" / "forget.jsonl", count=3, with_images=multimodal)
    retain = write_samples(tmp_path / "data" / "retain.jsonl", count=4, with_images=multimodal, offset=3)
    if architecture.image_required:  # Mllama: an image for every sample
        for split in (forget, retain):
            records = [json.loads(line) for line in split.read_text().splitlines()]
            for record in records:
                record.setdefault("image", "images/p0.png")
            split.write_text("".join(json.dumps(record) + "\n" for record in records))
    spec = ModelSpec(str(source))
    retain_profile = run_profile(spec, retain, tmp_path / "r.safetensors", ProfileOptions(split="retain")).path
    forget_profile = run_profile(
        spec, forget, tmp_path / "f.safetensors", ProfileOptions(split="forget", batch_size=1)
    ).path
    accessor = run_accessor(forget_profile, retain_profile, tmp_path / "a.safetensors", AccessorOptions()).path
    exposure = read_artifact(accessor, ACCESSOR_FORMAT).layer_tensor(1, "exposure")
    assert exposure.numel() == checkpoint.num_vectors(1) and bool((exposure > 0).any())

    one_shot = run_apply(spec, accessor, tmp_path / "one-shot", ApplyOptions(gamma=GAMMA, layers="1")).path
    applied = tmp_path / "progressive.exposure.safetensors"
    progressive = run_progressive(
        spec,
        forget,
        retain_profile,
        tmp_path / "progressive",
        ApplyOptions(gamma=GAMMA, layers="1", progressive=True),
        exposure_out=applied,
    ).path
    progressive_exposure = read_artifact(applied, ACCESSOR_FORMAT).layer_tensor(1, "exposure")

    before = _all_tensors(source)
    shape = [1, 1]
    shape[architecture.vector_axis] = -1  # vector i: a column, or a row of GPT-2's Conv1D weight
    original = before[names[1]]
    for out, layer_exposure in ((one_shot, exposure), (progressive, progressive_exposure)):
        after = _all_tensors(out)
        assert after.keys() == before.keys()  # the published names are kept
        changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
        assert changed == [PUBLISHED[model_type]]
        expected = (original.float() * gates(layer_exposure, GAMMA).reshape(shape)).to(original.dtype)
        assert torch.equal(after[names[1]], expected)
    result = invoke("verify", one_shot, "--base", source, "--accessor", accessor)
    assert result.exit_code == 0, result.output

    image = tmp_path / "data" / "images" / "p0.png" if multimodal else None
    for out in (one_shot, progressive):
        assert isinstance(_generate(out, model_type, image), str)
