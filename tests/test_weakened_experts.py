"""A fused (E, ., .) experts tensor weakened as it streams through apply's copy (kvwctl.weakened).

The bytes must be those of ``method.scale_expert_vectors`` on the whole tensor, for both vector
axes (gpt-oss ``(E, m, d)``: axis 1; the transformers 5 module layout ``(E, d, m)``: axis 2) and for
blocks smaller than a row, cut inside an expert's slab and spanning several experts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_shardcopy import CPU, DTYPES, shard_with

from kvwctl.method import gates, scale_expert_vectors, tensor_bytes
from kvwctl.shardcopy import copy_with_patches
from kvwctl.weakened import WeakenedWeight


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("block_size", [1, 5 * 6 * 2 + 3, 1 << 20])
def test_a_fused_experts_tensor_is_scale_expert_vectors(dtype: str, axis: int, block_size: int, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(3, 5, 6, generator=generator, dtype=torch.float64) * 3).to(DTYPES[dtype])  # (E, a, b)
    gate = gates(torch.rand(3, weight.shape[axis], generator=generator) * 4, 0.7)  # (E, m)
    projection = shard_with(weight, tmp_path / "in")
    patch = WeakenedWeight(projection, gate, axis=axis, device=CPU, refusal="refusing")
    span = (projection.data_start, projection.data_end)
    copy_with_patches(tmp_path / "in", tmp_path / "out", {span: patch}, block_size=block_size)
    expected = tensor_bytes(scale_expert_vectors(weight, gate, axis=axis))
    original = (tmp_path / "in").read_bytes()
    written = (tmp_path / "out").read_bytes()
    assert expected != tensor_bytes(weight)  # the test edits something
    assert written == original[: span[0]] + expected + original[span[1] :]
    assert patch.digest.hexdigest() == hashlib.sha256(expected).hexdigest()


def test_gates_that_do_not_fit_a_fused_tensor_are_refused(tmp_path: Path) -> None:
    projection = shard_with(torch.ones(3, 5, 6), tmp_path / "in")
    with pytest.raises(ValueError, match=r"with vectors on axis 2 does not fit gates \[3, 5\]"):
        WeakenedWeight(projection, torch.ones(3, 5), axis=2, device=CPU, refusal="refusing")
