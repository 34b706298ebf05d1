"""Tune's trials in memory: a loaded model weakened in place, scored, and restored.

A trial edits the loaded model exactly as ``kvwctl apply`` edits the files: each edited layer's
down-projection weight becomes ``scale_vectors(W, exp(-γ E))`` computed in float32 from the
**stored** weight (read from the checkpoint's shard, in its stored dtype) and rounded once to that
dtype, then cast to the dtype the model runs in — the same cast ``from_pretrained`` applies when
``kvwctl eval`` loads the written checkpoint. Leaving the block restores every edited layer to the
stored weight in the running dtype, bit for bit what loading the original gives.

Scoring uses eval's own functions (``kvwctl.evaluate``): the **screen** is the teacher-forced
``answer_logprob`` and ``mc_acc`` (no generation), the **generation** adds ``rougeL_recall``,
``rougeL_f1`` and ``keyword_acc`` from greedy decoding. Values are kept per sample, in sample
order, so that any fold's mean can be formed later (``summaries``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvwctl.errors import ModelError
from kvwctl.evaluate import RenderedSplit, answer_scores_and_choices, generate_answers, score_conversations
from kvwctl.method import gates, scale_vectors
from kvwctl.metrics import MetricSummary, keyword_accuracy, keyword_targets, rouge_l, summarize
from kvwctl.placement import read_weight, write_weight
from kvwctl.progress import Tracker

if TYPE_CHECKING:
    import torch

    from kvwctl.layercache import LayerInputCache
    from kvwctl.modeling import LoadedModel

SCREEN_METRICS = ("answer_logprob", "mc_acc")
GENERATION_METRICS = ("rougeL_recall", "rougeL_f1", "keyword_acc")
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# split -> metric -> one value per sample (None: the sample has no such metric, e.g. mc_acc without options)
Values = dict[str, dict[str, list[float | None]]]


class TrialModel:
    """A loaded model whose down projections a trial weakens in place (see the module docstring)."""

    def __init__(self, loaded: LoadedModel) -> None:
        import torch
        from safetensors import safe_open

        self.loaded = loaded
        checkpoint = loaded.checkpoint
        self.axis = checkpoint.architecture.vector_axis
        self.stored: list[torch.Tensor] = []  # per layer, as stored on disk (on the model's device)
        self.dtypes: list[torch.dtype] = []  # per layer, the dtype the model runs it in
        by_shard: dict[str, list[int]] = {}
        for projection in checkpoint.down_projections:
            by_shard.setdefault(projection.shard, []).append(projection.layer)
        tensors: dict[int, torch.Tensor] = {}
        for shard, layers in by_shard.items():
            with safe_open(str(checkpoint.path / shard), framework="pt") as stream:
                for layer in layers:
                    tensors[layer] = stream.get_tensor(checkpoint.down_projections[layer].name)
        for layer, module in enumerate(loaded.down_projections):
            stored = tensors[layer]
            loaded_weight = read_weight(module)  # also when accelerate offloads it (--device-map)
            if tuple(stored.shape) != tuple(loaded_weight.shape):
                raise ModelError(
                    f"layer {layer}: the stored down projection has shape {tuple(stored.shape)}, the loaded "
                    f"module {tuple(loaded_weight.shape)}; tune cannot edit it in memory as apply edits the file"
                )
            if not torch.equal(stored.to(loaded_weight.dtype).to(loaded_weight.device), loaded_weight):
                raise ModelError(f"layer {layer}: the loaded down projection differs from the stored weight")
            self.stored.append(stored.to(loaded_weight.device))
            self.dtypes.append(loaded_weight.dtype)

    @contextmanager
    def weakened(self, exposures: Sequence[torch.Tensor], gamma: float, layers: Sequence[int]) -> Iterator[None]:
        """The model with ``layers`` scaled by ``exp(-gamma * E)`` inside the block; restored after."""
        import torch

        modules = self.loaded.down_projections
        edited: list[int] = []
        try:
            with torch.no_grad():
                for layer in layers:
                    stored = self.stored[layer]
                    gate = gates(exposures[layer].to(stored.device), gamma)  # (m,)
                    edited.append(layer)
                    write_weight(modules[layer], scale_vectors(stored, gate, axis=self.axis).to(self.dtypes[layer]))
            yield
        finally:
            with torch.no_grad():
                for layer in edited:
                    write_weight(modules[layer], self.stored[layer].to(self.dtypes[layer]))


def screen_values(
    loaded: LoadedModel,
    prepared: RenderedSplit,
    *,
    batch_size: int,
    tracker: Tracker,
    description: str,
    layer_cache: LayerInputCache | None = None,
) -> dict[str, list[float | None]]:
    """``answer_logprob`` and ``mc_acc`` of every sample, as eval computes them (``layer_cache``:
    the layers below the trials' first edited layer are run once per batch, ``kvwctl.layercache``)."""
    scores = score_conversations(
        loaded,
        prepared.conversations,
        batch_size=batch_size,
        tracker=tracker,
        description=description,
        layer_cache=layer_cache,
    )
    answer_scores, choices = answer_scores_and_choices(prepared, iter(scores))
    return {
        "answer_logprob": list(answer_scores),
        "mc_acc": [
            None if choice is None else float(choice == sample.answer)
            for sample, choice in zip(prepared.split.samples, choices, strict=True)
        ],
    }


def generation_values(
    loaded: LoadedModel,
    prepared: RenderedSplit,
    *,
    max_new_tokens: int,
    batch_size: int,
    tracker: Tracker,
    description: str,
) -> tuple[list[str], dict[str, list[float | None]]]:
    """The greedy generations and their metrics (ROUGE-L, keyword accuracy), as eval computes them."""
    samples = prepared.split.samples
    generations = generate_answers(
        loaded, samples, max_new_tokens=max_new_tokens, batch_size=batch_size, tracker=tracker, description=description
    )
    rouge = [rouge_l(sample.answer, generation) for sample, generation in zip(samples, generations, strict=True)]
    values: dict[str, list[float | None]] = {
        "rougeL_recall": [recall for recall, _ in rouge],
        "rougeL_f1": [f1 for _, f1 in rouge],
        "keyword_acc": [
            keyword_accuracy(keyword_targets(sample), generation)
            for sample, generation in zip(samples, generations, strict=True)
        ],
    }
    return generations, values


def summaries(values: Values, indices: dict[str, list[int]] | None = None) -> dict[str, dict[str, MetricSummary]]:
    """Per split and metric, the summary over the samples at ``indices[split]`` (all without)."""
    result: dict[str, dict[str, MetricSummary]] = {}
    for split, metrics in values.items():
        chosen = None if indices is None else indices[split]
        result[split] = {
            metric: summarize(per_sample if chosen is None else [per_sample[index] for index in chosen])
            for metric, per_sample in metrics.items()
        }
    return result


def summaries_json(summary: dict[str, dict[str, MetricSummary]]) -> dict[str, Any]:
    return {split: {metric: value.to_json() for metric, value in metrics.items()} for split, metrics in summary.items()}
