"""kvwctl.layercache: a trial's screen from the first edited layer equals the full forward pass, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import invoke, split_for

from kvwctl.checkpoint import open_checkpoint
from kvwctl.evaluate import load_split, render_split, score_conversations
from kvwctl.layercache import LayerInputCache, first_difference, inputs_key, prefix_digest
from kvwctl.modeling import LoadedModel, load_model
from kvwctl.progress import NullTracker
from kvwctl.source import resolve_model
from kvwctl.trials import TrialModel


def _load(checkpoint: Path) -> LoadedModel:
    return load_model(open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32)


def _scores(loaded: LoadedModel, prepared: Any, cache: LayerInputCache | None) -> list[float]:
    """Teacher-forced scores in batches of 3, through ``cache`` when given."""
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
    cache = LayerInputCache(first)
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
    cache = LayerInputCache(1, budget_bytes=0)
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


def test_models_share_the_states_only_when_their_lower_layers_are_the_same(
    checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    base = checkpoints["qwen2"]
    applied = tmp_path / "applied"
    result = invoke(
        "apply", "--model", base, "--accessor", accessor, "--gamma", "3", "--layers", "2:", "--out", applied
    )
    assert result.exit_code == 0, result.stderr
    original, edited = (open_checkpoint(resolve_model(str(path))) for path in (base, applied))
    assert first_difference(original, edited) == 2
    assert first_difference(original, original) is None  # nothing differs: nothing to skip to
    assert first_difference(original, open_checkpoint(resolve_model(str(checkpoints["llama"])))) is None
    cpu, f32 = torch.device("cpu"), torch.float32
    assert prefix_digest(original, 2, f32, cpu) == prefix_digest(edited, 2, f32, cpu)
    assert prefix_digest(original, 3, f32, cpu) != prefix_digest(edited, 3, f32, cpu)  # layer 2 differs
    assert prefix_digest(original, 2, f32, cpu) != prefix_digest(original, 2, torch.bfloat16, cpu)

    # The edited model replays the original's states: its scores are its own full pass's exactly.
    cache = LayerInputCache(2)
    first_model, second_model = _load(base), _load(applied)
    prepared = render_split(first_model.renderer, load_split("retain", data["retain-text"]))
    _scores(first_model, prepared, cache)
    assert _scores(second_model, prepared, cache) == _scores(second_model, prepared, None)
    assert cache.replayed == cache.captured > 0


def test_eval_with_the_shared_cache_writes_the_same_files(
    checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.evaluate as evaluate

    base, applied = checkpoints["qwen2"], tmp_path / "applied"
    assert (
        invoke(
            "apply", "--model", base, "--accessor", accessor, "--gamma", "3", "--layers", "2:", "--out", applied
        ).exit_code
        == 0
    )
    caches: list[LayerInputCache | None] = []
    shared = evaluate.shared_layer_cache

    def spy(*args: Any) -> Any:
        cache, roles = shared(*args)
        caches.append(cache)
        return cache, roles

    def run(out: Path) -> tuple[bytes, bytes]:
        result = invoke(
            "eval", "--model", applied, "--baseline", base, "--out", out, "--max-new-tokens", "3", "--batch-size", "3",
            "--data", f"forget={data['forget-text']}", "--data", f"retain={data['retain-text']}",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return out.read_bytes(), out.with_name(f"{out.stem}.samples.jsonl").read_bytes()

    monkeypatch.setattr(evaluate, "shared_layer_cache", spy)
    with_cache = run(tmp_path / "cached.json")
    (cache,) = caches
    assert cache is not None and cache.first == 2 and cache.replayed > 0
    monkeypatch.setattr(evaluate, "shared_layer_cache", lambda *args: (None, set()))
    assert run(tmp_path / "plain.json") == with_cache
