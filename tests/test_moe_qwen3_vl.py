"""Qwen3-VL-MoE end to end on image and text samples: the fused experts as the published
checkpoints orient them, ``(E, m, d)`` (transposed by transformers 5 at load time), and as
transformers 5.24's own ``save_pretrained`` writes them, ``(E, d, m)``."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from moe_pipeline import check_outputs, exposures_of, run_pipeline, stored_tensors

from kvwctl.testing_moe import NUM_EXPERTS, build_moe_checkpoint

DOWN = "model.language_model.layers.{}.mlp.experts.down_proj"


def test_qwen3_vl_moe_published_orientation_end_to_end(tmp_path: Path) -> None:
    checkpoint = build_moe_checkpoint("qwen3_vl_moe", tmp_path / "model")
    names = stored_tensors(checkpoint)
    assert names[DOWN.format(0)].shape == (NUM_EXPERTS, 24, 32)  # (E, m, d)
    assert "model.language_model.layers.1.mlp.down_proj.weight" in names  # the dense layer
    paths = run_pipeline(checkpoint, tmp_path, with_images=True)
    retain = exposures_of(paths["retain"])
    assert retain["layers.0.experts.sum"].shape == (NUM_EXPERTS, 24)
    assert "layers.1.experts.sum" not in retain and retain["layers.1.sum"].shape == (48,)
    check_outputs(checkpoint, paths, expert_tensors=3, auto_class="AutoModelForImageTextToText")
    # transformers loads the weakened (E, m, d) tensor transposed: its (E, d, m) parameter is scaled
    # along the last axis, vector by vector.
    model = transformers.AutoModelForImageTextToText.from_pretrained(paths["one-shot"], dtype=torch.float32)
    loaded = model.model.language_model.layers[2].mlp.experts.down_proj.detach()  # (E, d, m)
    stored = stored_tensors(paths["one-shot"])[DOWN.format(2)]
    assert torch.equal(loaded, stored.transpose(1, 2))


def test_qwen3_vl_moe_module_orientation(tmp_path: Path) -> None:
    checkpoint = build_moe_checkpoint("qwen3_vl_moe", tmp_path / "model", layout="module")
    base = stored_tensors(checkpoint)[DOWN.format(3)]
    assert base.shape == (NUM_EXPERTS, 32, 24)  # (E, d, m), as in memory
    paths = run_pipeline(checkpoint, tmp_path, with_images=True)
    exposure = exposures_of(paths["accessor"])["layers.3.experts.exposure"]  # (E, m)
    written = stored_tensors(paths["one-shot"])[DOWN.format(3)]
    expected = (base.double() * torch.exp(-0.5 * exposure.double())[:, None, :]).float()
    torch.testing.assert_close(written, expected, rtol=1e-6, atol=1e-7)
