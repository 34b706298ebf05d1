"""The mixture-of-experts pipeline test shared by the per-family test files (``test_moe_*.py``).

profile (retain, forget) -> accessor -> apply one-shot and progressive, through the CLI, on a tiny
checkpoint saved in the family's published on-disk layout; then every edited tensor is checked
against its hand computation from the exposure file, every other tensor byte for byte, ``kvwctl
verify --base`` recomputes the edit, and each output is loaded with transformers and generates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from helpers import invoke
from safetensors import safe_open

from kvwctl.testing import write_samples

GAMMA = "0.5"


def stored_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's shards, by name."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(checkpoint / shard), framework="pt") as stream:
            tensors.update({name: stream.get_tensor(name) for name in stream.keys()})
    return tensors


def exposures_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as stream:
        return {name: stream.get_tensor(name) for name in stream.keys()}


def expected_edit(name: str, weight: torch.Tensor, exposures: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The hand computation of one stored tensor after weakening every layer, or None if untouched.

    Written out per layout, independently of kvwctl's code: a per-expert 2-D weight (d, m) has its
    columns scaled by its expert's row of ``exp(-gamma * E)``; a fused (E, m, d) tensor (gpt-oss)
    its rows per expert; a dense or shared-expert down projection its columns.
    """
    parts = name.split(".")
    if "layers" not in parts:
        return None
    layer = int(parts[parts.index("layers") + 1])
    if ".experts." in name and name.endswith(("w2.weight", "down_proj.weight")):  # per expert (d, m)
        expert = int(parts[parts.index("experts") + 1])
        gate = torch.exp(-float(GAMMA) * exposures[f"layers.{layer}.experts.exposure"][expert].double())
        return (weight.double() * gate[None, :]).to(weight.dtype)
    if name.endswith("experts.down_proj"):  # fused as published (gpt-oss, Qwen3-VL-MoE): (E, m, d), rows
        gate = torch.exp(-float(GAMMA) * exposures[f"layers.{layer}.experts.exposure"].double())  # (E, m)
        return (weight.double() * gate[:, :, None]).to(weight.dtype)
    if name.endswith("mlp.down_proj.weight") or name.endswith("shared_expert.down_proj.weight"):
        gate = torch.exp(-float(GAMMA) * exposures[f"layers.{layer}.exposure"].double())
        return (weight.double() * gate[None, :]).to(weight.dtype)
    return None


def run_pipeline(checkpoint: Path, root: Path, *, with_images: bool = False) -> dict[str, Path]:
    """The whole pipeline through the CLI; returns the stage files and the two outputs."""
    forget = write_samples(root / "forget.jsonl", count=3, with_images=with_images)
    retain = write_samples(root / "retain.jsonl", count=4, with_images=with_images, offset=3)
    paths = {name: root / f"{name}.safetensors" for name in ("retain", "forget", "accessor")}
    for split, data in (("retain", retain), ("forget", forget)):
        result = invoke("profile", "--model", checkpoint, "--data", data, "--split", split, "--out", paths[split])
        assert result.exit_code == 0, result.output
    result = invoke("accessor", "--forget", paths["forget"], "--retain", paths["retain"], "--out", paths["accessor"])
    assert result.exit_code == 0, result.output
    paths["one-shot"] = root / "one-shot"
    result = invoke(
        "apply", "--model", checkpoint, "--accessor", paths["accessor"], "--gamma", GAMMA, "--out", paths["one-shot"]
    )
    assert result.exit_code == 0, result.output
    paths["progressive"] = root / "progressive"
    result = invoke(
        "apply", "--model", checkpoint, "--progressive", "--forget-data", forget, "--retain", paths["retain"],
        "--gamma", GAMMA, "--out", paths["progressive"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths["progressive-exposure"] = root / "progressive.exposure.safetensors"
    return paths


def check_outputs(
    checkpoint: Path, paths: dict[str, Path], *, expert_tensors: int, auto_class: str = "AutoModelForCausalLM"
) -> None:
    """Each output: edited tensors as computed by hand, the others byte-identical, loads and generates."""
    import transformers

    base = stored_tensors(checkpoint)
    for output, exposure_file in (("one-shot", "accessor"), ("progressive", "progressive-exposure")):
        exposures = exposures_of(paths[exposure_file])
        written = stored_tensors(paths[output])
        assert sorted(written) == sorted(base)
        edited = 0
        for name, weight in base.items():
            expected = expected_edit(name, weight, exposures)
            if expected is None:
                assert torch.equal(written[name], weight), name
                continue
            edited += 1
            torch.testing.assert_close(written[name], expected, rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(written[name], weight), f"{name} was not weakened"
        assert edited >= expert_tensors
        manifest = json.loads((paths[output] / "kvw_manifest.json").read_text())
        assert manifest["per_layer"]["0"]["vectors"] == sum(
            math.prod(tensor.shape) for part, tensor in exposures.items() if part.startswith("layers.0.")
        )
        # kvwctl verify recomputes the edit tensor by tensor, per expert, from the base and the exposure.
        result = invoke("verify", paths[output], "--base", checkpoint, "--accessor", paths[exposure_file])
        assert result.exit_code == 0, result.output
        assert f"{edited} edited tensors recomputed exactly" in " ".join(result.stderr.split())
        model = getattr(transformers, auto_class).from_pretrained(paths[output], dtype=torch.float32)
        generated = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 6)
    one_shot, progressive = exposures_of(paths["accessor"]), exposures_of(paths["progressive-exposure"])
    assert sorted(one_shot) == sorted(progressive)
    # Progressive batches see the already weakened model: the exposures differ (measured, not assumed).
    assert any(not torch.equal(one_shot[name], progressive[name]) for name in one_shot)
