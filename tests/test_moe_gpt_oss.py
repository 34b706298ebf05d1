"""gpt-oss end to end in its bf16 on-disk layout (fused ``mlp.experts.down_proj`` (E, m, d) with a
bias), and the MXFP4-quantised layout of the published files refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers import expect_error, invoke
from moe_pipeline import check_outputs, run_pipeline, stored_tensors
from safetensors.torch import save_file

from kvwctl.testing import write_samples
from kvwctl.testing_moe import NUM_EXPERTS, build_moe_checkpoint


def test_gpt_oss_end_to_end(tmp_path: Path) -> None:
    checkpoint = build_moe_checkpoint("gpt_oss", tmp_path / "model")
    names = stored_tensors(checkpoint)
    assert names["model.layers.0.mlp.experts.down_proj"].shape == (NUM_EXPERTS, 48, 32)  # (E, m, d)
    paths = run_pipeline(checkpoint, tmp_path)
    check_outputs(checkpoint, paths, expert_tensors=4)
    # The biases are not knowledge vectors: untouched.
    written = stored_tensors(paths["one-shot"])
    assert torch.equal(
        written["model.layers.0.mlp.experts.down_proj_bias"], names["model.layers.0.mlp.experts.down_proj_bias"]
    )


def test_quantised_experts_are_refused(tmp_path: Path) -> None:
    checkpoint = build_moe_checkpoint("gpt_oss", tmp_path / "model")
    data = write_samples(tmp_path / "retain.jsonl", count=1, with_images=False)
    quantised = tmp_path / "quantised"
    shutil.copytree(checkpoint, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (quantised / "config.json").write_text(json.dumps(config))
    result = invoke("profile", "--model", quantised, "--data", data, "--split", "retain", "--out", tmp_path / "r.st")
    expect_error(result, "the expert weights are quantised (quantization_config 'mxfp4')")
    # MXFP4 tensors as the published files name them, without a quantization_config.
    blocks = tmp_path / "blocks"
    shutil.copytree(checkpoint, blocks)
    index_path = blocks / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file(
        {"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(4, 2, dtype=torch.uint8)},
        blocks / "extra.safetensors",
    )
    index["weight_map"]["model.layers.0.mlp.experts.down_proj_blocks"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    result = invoke("profile", "--model", blocks, "--data", data, "--split", "retain", "--out", tmp_path / "r.st")
    expect_error(result, "the expert weights are quantised (model.layers.0.mlp.experts.down_proj_blocks)")
    assert not (tmp_path / "r.st").exists()
