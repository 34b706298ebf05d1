"""Mixtral end to end, in the published per-expert layout (``block_sparse_moe.experts.E.w2.weight``)
and in the transformers 5 module layout (fused ``mlp.experts.down_proj`` (E, d, m))."""

from __future__ import annotations

from pathlib import Path

import torch
from moe_pipeline import check_outputs, exposures_of, run_pipeline, stored_tensors

from kvwctl.testing_moe import NUM_EXPERTS, build_moe_checkpoint


def test_mixtral_per_expert_layout_end_to_end(tmp_path: Path) -> None:
    checkpoint = build_moe_checkpoint("mixtral", tmp_path / "model")
    names = stored_tensors(checkpoint)
    assert "model.layers.3.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(name.endswith("experts.down_proj") for name in names)
    paths = run_pipeline(checkpoint, tmp_path)
    retain = exposures_of(paths["retain"])
    # Every layer is sparse: no dense sum, per expert sums (E, m) and counts (E,) whose total is
    # top-2 times the profiled positions (each position is routed to two experts).
    assert "layers.0.sum" not in retain
    assert retain["layers.0.experts.sum"].shape == (NUM_EXPERTS, 48)
    assert int(retain["layers.0.experts.count"].sum()) == 2 * int(retain["count"])
    check_outputs(checkpoint, paths, expert_tensors=4 * NUM_EXPERTS)


def test_mixtral_module_layout_gives_the_same_exposures(tmp_path: Path) -> None:
    """The fused module-tree layout on disk: same model, same accessor; fused tensors scaled per expert."""
    checkpoint = build_moe_checkpoint("mixtral", tmp_path / "model", layout="module")
    names = stored_tensors(checkpoint)
    assert names["model.layers.0.mlp.experts.down_proj"].shape == (NUM_EXPERTS, 32, 48)  # (E, d, m)
    paths = run_pipeline(checkpoint, tmp_path)
    exposure = exposures_of(paths["accessor"])["layers.1.experts.exposure"]  # (E, m)
    base = names["model.layers.1.mlp.experts.down_proj"]
    written = stored_tensors(paths["one-shot"])["model.layers.1.mlp.experts.down_proj"]
    expected = (base.double() * torch.exp(-0.5 * exposure.double())[:, None, :]).float()
    torch.testing.assert_close(written, expected, rtol=1e-6, atol=1e-7)
