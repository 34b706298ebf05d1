"""GPT-2 (Conv1D: knowledge vectors are rows), GPT-NeoX and OLMo 2: profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_pipeline import check_family


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "olmo2"])
def test_family_end_to_end(model_type: str, tmp_path: Path) -> None:
    check_family(model_type, tmp_path)


def test_tune_trials_weaken_gpt2_rows_in_memory(tmp_path: Path) -> None:
    """tune's in-memory trials scale the rows of GPT-2's ``Conv1D`` weight, as apply does on disk."""
    import torch

    from kvwctl.checkpoint import open_checkpoint
    from kvwctl.method import gates
    from kvwctl.modeling import load_model
    from kvwctl.source import resolve_model
    from kvwctl.testing_families import build_checkpoint
    from kvwctl.trials import TrialModel

    checkpoint = open_checkpoint(resolve_model(str(build_checkpoint("gpt2", tmp_path / "gpt2"))))
    loaded = load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    weight = loaded.down_projections[1].weight  # (m, d_model) = (48, 32)
    assert tuple(weight.shape) == (48, 32) and checkpoint.num_vectors(1) == 48
    original = weight.detach().clone()
    exposures = [torch.zeros(48), torch.linspace(0.0, 4.0, 48)]
    with TrialModel(loaded).weakened(exposures, 0.5, [1]):
        assert torch.equal(weight, original * gates(exposures[1], 0.5)[:, None])  # row i times g_i
    assert torch.equal(weight, original)
