"""kvwctl.layercache: a trial's screen from the first edited layer equals the full forward pass, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import split_for

from kvwctl.checkpoint import open_checkpoint
from kvwctl.evaluate import load_split, render_split, score_conversations
from kvwctl.layercache import LayerInputCache, inputs_key
from kvwctl.modeling import LoadedModel, load_model
from kvwctl.progress import NullTracker
from kvwctl.source import resolve_model
from kvwctl.trials import TrialModel


def _load(checkpoint: Path) -> LoadedModel:
    return load_model(open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32)


def _scores(loaded: LoadedModel, prepared: Any, cache: LayerInputCache | None) -> list[float]:
    return score_conversations(
        loaded, prepared.conversations, batch_size=3, tracker=NullTracker(), description="x", layer_cache=cache
    )


def _layer_calls(loaded: LoadedModel) -> list[int]:
    """Counts of forward calls per decoder layer's down projection, kept up to date by hooks."""
    calls = [0] * len(loaded.down_projections)
    for layer, module in enumerate(loaded.down_projections):
        module.register_forward_pre_hook(lambda *_, layer=layer: calls.__setitem__(layer, calls[layer] + 1))
    return calls


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "qwen2"])
def test_replayed_screen_equals_the_full_pass_and_skips_the_lower_layers(
    model_type: str, checkpoints: dict[str, Path], data: dict[str, Path]
) -> None:
    loaded = _load(checkpoints[model_type])
    prepared = render_split(loaded.renderer, load_split("retain", split_for(model_type, data, "retain")))
    batches = -(-len(prepared.conversations) // 3)
    first = 1
    full = _scores(loaded, prepared, None)
    cache = LayerInputCache(loaded, first)
    calls = _layer_calls(loaded)
    assert _scores(loaded, prepared, cache) == full  # the capturing pass is a full pass
    assert (cache.captured, cache.replayed) == (batches, 0)
    assert calls[0] == batches

    # A trial edits layers `first` and above: the replay must give exactly the full pass's scores.
    trial = TrialModel(loaded)
    layers = list(range(first, len(loaded.down_projections)))
    exposures = [
        torch.rand(module.weight.shape[1], generator=torch.Generator().manual_seed(layer))
        for layer, module in enumerate(loaded.down_projections)
    ]
    with trial.weakened(exposures, 2.0, layers):
        weakened_full = _scores(loaded, prepared, None)
        before = list(calls)
        weakened_cached = _scores(loaded, prepared, cache)
    assert weakened_full != full  # the edit changes the scores, so equality below means something
    assert weakened_cached == weakened_full
    assert cache.replayed == batches
    assert calls[0] == before[0]  # layer 0 did not run during the replay
    assert calls[first] == before[first] + batches
    # The skipped layers are back in place: a plain pass runs them again.
    _scores(loaded, prepared, None)
    assert calls[0] == before[0] + batches


def test_over_the_budget_a_batch_runs_in_full(checkpoints: dict[str, Path], data: dict[str, Path]) -> None:
    loaded = _load(checkpoints["llava"])
    prepared = render_split(loaded.renderer, load_split("forget", data["forget"]))
    full = _scores(loaded, prepared, None)
    cache = LayerInputCache(loaded, 1, budget_bytes=0)
    assert _scores(loaded, prepared, cache) == full
    assert _scores(loaded, prepared, cache) == full
    assert (cache.captured, cache.replayed, cache.used_bytes) == (0, 0, 0)


def test_a_batch_is_known_by_its_inputs_bytes() -> None:
    ids = torch.tensor([[1, 2, 3]])
    pixels = torch.zeros(1, 3, 4, 4)
    key = inputs_key({"input_ids": ids, "pixel_values": pixels})
    assert key == inputs_key({"pixel_values": pixels.clone(), "input_ids": ids.clone()})
    changed = pixels.clone()
    changed[0, 0, 0, 0] = 1e-6
    assert key != inputs_key({"input_ids": ids, "pixel_values": changed})
    assert key != inputs_key({"input_ids": torch.tensor([[1, 2, 4]]), "pixel_values": pixels})
    assert key != inputs_key({"input_ids": ids.to(torch.int32), "pixel_values": pixels})
