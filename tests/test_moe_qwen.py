"""Qwen2-MoE and Qwen3-MoE end to end in the published layout (``mlp.experts.E.down_proj.weight``),
with a dense layer (``mlp_only_layers``) and, for Qwen2-MoE, the shared expert as an ordinary MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_pipeline import check_outputs, exposures_of, run_pipeline, stored_tensors

from kvwctl.testing_moe import NUM_EXPERTS, build_moe_checkpoint


@pytest.mark.parametrize(("model_type", "dense_layer"), [("qwen2_moe", 1), ("qwen3_moe", 2)])
def test_qwen_moe_end_to_end(tmp_path: Path, model_type: str, dense_layer: int) -> None:
    checkpoint = build_moe_checkpoint(model_type, tmp_path / "model")
    names = stored_tensors(checkpoint)
    assert f"model.layers.0.mlp.experts.{NUM_EXPERTS - 1}.down_proj.weight" in names
    assert f"model.layers.{dense_layer}.mlp.down_proj.weight" in names
    paths = run_pipeline(checkpoint, tmp_path)
    retain = exposures_of(paths["retain"])
    accessor = exposures_of(paths["accessor"])
    assert f"layers.{dense_layer}.experts.sum" not in retain  # the dense layer has no experts
    assert retain[f"layers.{dense_layer}.sum"].shape == (48,)
    assert retain["layers.0.experts.sum"].shape == (NUM_EXPERTS, 24)
    assert int(retain["layers.0.experts.count"].sum()) == 2 * int(retain["count"])
    if model_type == "qwen2_moe":  # the shared expert sees every token: the layer's dense part
        assert retain["layers.0.sum"].shape == (40,)
        assert accessor["layers.0.exposure"].shape == (40,)
    else:
        assert "layers.0.sum" not in retain
    assert accessor["layers.0.experts.exposure"].shape == (NUM_EXPERTS, 24)
    check_outputs(checkpoint, paths, expert_tensors=3 * NUM_EXPERTS)
