"""The benchmark's rows: each stage of kvwctl and its baselines, as (setup, timed work) pairs.

A row's ``setup`` (not timed, not counted in memory) loads what the row starts from; its ``work``
is timed and returns how much it did (tokens, bytes or samples). ``benchmarks/run.py`` runs each
row in a forked child of its own, so rows do not share an allocator or a CUDA context.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sizes import Size

from kvwctl.data import load_samples
from kvwctl.modeling import (
    LoadedModel,
    encode_batch,
    encode_prompts,
    length_order,
    load_model,
    render_all,
)
from kvwctl.options import ApplyOptions, EvalOptions
from kvwctl.progress import NullTracker
from kvwctl.source import ModelSpec

GAMMA = 0.02


@dataclass(frozen=True)
class Context:
    """What every row of one size works from (made once per size by ``run.py``, not timed)."""

    size: Size
    checkpoint: Path
    data: dict[str, Path]  # retain, forget, eval
    accessor: Path  # of the forget split against the retain split
    retain_profile: Path
    scratch: Path  # outputs of the timed work go here
    device: str
    dtype: str

    def load(self) -> LoadedModel:
        import torch

        from kvwctl.checkpoint import open_checkpoint
        from kvwctl.source import resolve_model

        checkpoint = open_checkpoint(resolve_model(str(self.checkpoint)))
        return load_model(checkpoint, device=torch.device(self.device), dtype=getattr(torch, self.dtype))


@dataclass(frozen=True)
class Row:
    stage: str
    name: str
    kvwctl: bool  # the stage's kvwctl row, which the others are compared with
    unit: str  # what work() returns: tokens, MB or samples
    setup: Callable[[Context], Any]
    work: Callable[[Context, Any], float]


def synchronize(context: Context) -> None:
    import torch

    if context.device.startswith("cuda"):
        torch.cuda.synchronize()


def _rendered(context: Context, split: str) -> tuple[LoadedModel, list[Any]]:
    """The model loaded and warmed up (one untimed forward of one sample), and the split rendered.

    The warm-up takes the process's one-time costs (kernel selection, allocator growth, CUDA
    context) out of the rows that measure throughput, for every such row alike.
    """
    loaded = context.load()
    rendered = render_all(loaded.renderer, load_samples(context.data[split]))
    import torch

    with torch.inference_mode():
        loaded.model.base_model(**encode_batch(loaded, rendered[:1], positions="answer").inputs, use_cache=False)
    synchronize(context)
    return loaded, rendered


def _batches(rendered: list[Any], batch_size: int, *, sort: bool) -> list[list[Any]]:
    ordered = [rendered[index] for index in length_order(rendered)] if sort else rendered
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def _tokens(batches: list[Any]) -> float:
    return float(sum(int(batch.inputs["attention_mask"].sum()) for batch in batches))


# --- profile -----------------------------------------------------------------------------------


def profile_work(context: Context, state: Any) -> float:
    """kvwctl's own path: ``collect_sums`` as ``kvwctl profile`` calls it (length order, encoding included)."""
    from kvwctl.profile import collect_sums

    loaded, rendered, tokens = state
    ordered = [rendered[index] for index in length_order(rendered)]
    collect_sums(
        loaded, ordered, positions="answer", batch_size=context.size.batch_size, tracker=NullTracker(), description=""
    )
    synchronize(context)
    return float(tokens)


def profile_setup(context: Context) -> Any:
    loaded, rendered = _rendered(context, "retain")
    batches = [encode_batch(loaded, batch, positions="answer") for batch in _batches(rendered, 1, sort=False)]
    return loaded, rendered, _tokens(batches)


def bare_setup(context: Context, *, sort: bool = True) -> Any:
    """The same batches as the profile's, encoded beforehand (so the bare pass does not tokenize)."""
    loaded, rendered = _rendered(context, "retain")
    batches = [
        encode_batch(loaded, batch, positions="answer")
        for batch in _batches(rendered, context.size.batch_size, sort=sort)
    ]
    return loaded, batches


def bare_work(context: Context, state: Any) -> float:
    """The base decoder (and vision tower) alone: no hooks, no head."""
    loaded, batches = state
    import torch

    with torch.inference_mode():
        for batch in batches:
            loaded.model.base_model(**batch.inputs, use_cache=False)
    synchronize(context)
    return _tokens(batches)


def reference_work(context: Context, state: Any) -> float:
    """As the authors' code runs: batch 1, a full forward with logits, a host sync per layer per sample."""
    loaded, rendered, tokens = state
    reference_sums(loaded, rendered)
    return float(tokens)


def reference_sums(loaded: LoadedModel, rendered: list[Any]) -> list[Any]:
    """The retain sums of ``|a|`` per layer (numpy float64), one sample at a time, summed on the host.

    Each hook selects the layer's profiled positions with a boolean mask (a ``.nonzero()`` inside),
    copies their ``|a|`` sums to the host (``.cpu()``) and reads the count with ``.item()``.
    """
    import numpy
    import torch

    sums = [numpy.zeros(module.in_features) for module in loaded.down_projections]
    mask: list[Any] = [None]

    def hook(layer: int) -> Any:
        def record(module: Any, args: tuple[Any, ...]) -> None:
            selected = args[0][0][mask[0]]  # (positions, m)
            sums[layer] += selected.abs().double().sum(dim=0).cpu().numpy()
            assert int(selected.shape[0]) == mask[0].sum().item()

        return record

    handles = [module.register_forward_pre_hook(hook(layer)) for layer, module in enumerate(loaded.down_projections)]
    try:
        with torch.inference_mode():
            for item in rendered:
                batch = encode_batch(loaded, [item], positions="answer")
                mask[0] = batch.position_mask[0]
                loaded.model(**batch.inputs)  # (1, sequence, vocab) logits, as a plain forward gives
    finally:
        for handle in handles:
            handle.remove()
    return sums


def gradient_ascent_setup(context: Context) -> Any:
    import torch

    loaded, rendered = _rendered(context, "retain")
    loaded.model.train()
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(True)
    batches = [
        encode_batch(loaded, batch, positions="answer")
        for batch in _batches(rendered, context.size.batch_size, sort=True)
    ]
    return loaded, batches, torch.optim.AdamW(loaded.model.parameters(), lr=1e-5)


def gradient_ascent_work(context: Context, state: Any) -> float:
    """Full fine-tuning, one step per batch: forward with logits, minus the answer NLL, backward, AdamW."""
    import torch

    loaded, batches, optimizer = state
    for batch in batches:
        logits = loaded.model(**batch.inputs).logits  # (batch, sequence, vocab)
        labels = batch.inputs["input_ids"][:, 1:]  # the token each position predicts
        mask = batch.position_mask[:, :-1]  # (batch, sequence - 1): positions predicting answer tokens
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), labels[mask])
        torch.autograd.backward(-nll)  # ascent: the gradient of minus the NLL
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(context)
    return _tokens(batches)


# --- one-shot apply ----------------------------------------------------------------------------


def _checkpoint_megabytes(context: Context) -> float:
    return sum(path.stat().st_size for path in context.checkpoint.iterdir() if path.is_file()) / 1e6


def _fresh_out(context: Context, name: str) -> Path:
    out = context.scratch / name
    if out.exists():
        shutil.rmtree(out)
    return out


def apply_setup(context: Context) -> Any:
    return _fresh_out(context, "applied")


def apply_work(context: Context, out: Any) -> float:
    from kvwctl.apply import run_apply

    options = ApplyOptions(gamma=GAMMA, layers=":", device=context.device)
    run_apply(ModelSpec(str(context.checkpoint)), context.accessor, out, options)
    synchronize(context)
    return _checkpoint_megabytes(context)


def copy_setup(context: Context) -> Any:
    return _fresh_out(context, "copied")


def copy_work(context: Context, out: Any) -> float:
    """Every file of the checkpoint copied as it is: the disk's (or page cache's) bandwidth."""
    out.mkdir(parents=True)
    for path in sorted(context.checkpoint.iterdir()):
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    return _checkpoint_megabytes(context)


def transformers_setup(context: Context) -> Any:
    return _fresh_out(context, "resaved")


def transformers_work(context: Context, out: Any) -> float:
    """``from_pretrained`` -> scale the knowledge vectors -> ``save_pretrained`` (no checks, no manifest)."""
    import torch
    import transformers

    from kvwctl.artifacts import ACCESSOR_FORMAT, read_artifact
    from kvwctl.checkpoint import open_checkpoint
    from kvwctl.modeling import down_projection_modules
    from kvwctl.source import resolve_model

    checkpoint = open_checkpoint(resolve_model(str(context.checkpoint)))
    model_class = getattr(transformers, checkpoint.architecture.auto_class)
    model = model_class.from_pretrained(context.checkpoint, dtype=getattr(torch, context.size.dtype))
    accessor = read_artifact(context.accessor, ACCESSOR_FORMAT)
    with torch.no_grad():
        modules, _ = down_projection_modules(model, checkpoint)  # dense models: no experts
        for layer, module in enumerate(modules):
            gate = torch.exp(-GAMMA * accessor.layer_tensor(layer, "exposure").float())  # (m,)
            module.weight.copy_((module.weight.float() * gate).to(module.weight.dtype))  # columns scaled
    model.save_pretrained(out, max_shard_size=context.size.shard_size)
    return _checkpoint_megabytes(context)


# --- progressive apply -------------------------------------------------------------------------


def progressive_work(context: Context, out: Any) -> float:
    """``kvwctl apply --progressive``, forget batch 1: loading, Algorithm 1 and writing included."""
    from kvwctl.progressive import run_progressive

    options = ApplyOptions(gamma=GAMMA, layers=":", progressive=True, device=context.device, dtype=context.dtype)
    run_progressive(ModelSpec(str(context.checkpoint)), context.data["forget"], context.retain_profile, out, options)
    synchronize(context)
    return float(context.size.forget)


def forget_forward_setup(context: Context) -> Any:
    loaded, rendered = _rendered(context, "forget")
    return loaded, [encode_batch(loaded, [item], positions="answer") for item in rendered]


def forget_forward_work(context: Context, state: Any) -> float:
    """One forward of the base decoder per forget batch (batch 1): the least Algorithm 1 can do."""
    bare_work(context, state)
    return float(len(state[1]))


# --- eval --------------------------------------------------------------------------------------


def eval_setup(context: Context) -> Any:
    return context.scratch / "eval.json"


def eval_work(context: Context, out: Any) -> float:
    """``kvwctl eval`` of one model on one split: loading, generation, answer scores, multiple choice."""
    from kvwctl.evaluate import run_eval

    size = context.size
    options = EvalOptions(
        max_new_tokens=size.max_new_tokens, batch_size=size.batch_size, device=context.device, dtype=context.dtype,
        force=True,
    )  # fmt: skip
    run_eval({"model": ModelSpec(str(context.checkpoint))}, {"eval": context.data["eval"]}, out, options)
    return float(size.eval_samples)


def generate_work(context: Context, state: Any) -> float:
    """``model.generate`` on the same prompts, batches and tokens (loading included, as eval's is)."""
    import torch

    loaded = context.load()
    samples = load_samples(context.data["eval"])
    prompts = [loaded.renderer.render_prompt(sample) for sample in samples]
    size = context.size
    for start in range(0, len(prompts), size.batch_size):
        inputs = encode_prompts(loaded, prompts[start : start + size.batch_size])
        with torch.inference_mode():
            loaded.model.generate(
                **inputs, do_sample=False, max_new_tokens=size.max_new_tokens,
                pad_token_id=loaded.renderer.tokenizer.pad_token_id,
            )  # fmt: skip
    synchronize(context)
    return float(len(samples))


def nothing(context: Context) -> Any:
    return None


ROWS = [
    Row("profile", "kvwctl profile (collect_sums)", True, "tokens", profile_setup, profile_work),
    Row("profile", "bare forward, base decoder, same batches", False, "tokens", bare_setup, bare_work),
    Row("profile", "bare forward, unsorted batches", False, "tokens", lambda c: bare_setup(c, sort=False), bare_work),
    Row("profile", "reference-style loop (batch 1, sync per layer)", False, "tokens", profile_setup, reference_work),
    Row("profile", "gradient ascent (AdamW step per batch)", False, "tokens", gradient_ascent_setup,
        gradient_ascent_work),
    Row("apply", "kvwctl apply (run_apply)", True, "MB", apply_setup, apply_work),
    Row("apply", "plain copy (shutil.copyfile)", False, "MB", copy_setup, copy_work),
    Row("apply", "from_pretrained -> scale -> save_pretrained", False, "MB", transformers_setup, transformers_work),
    Row("progressive", "kvwctl apply --progressive (batch 1)", True, "samples",
        lambda c: _fresh_out(c, "progressive"), progressive_work),
    Row("progressive", "one forward per forget batch", False, "samples", forget_forward_setup, forget_forward_work),
    Row("eval", "kvwctl eval", True, "samples", eval_setup, eval_work),
    Row("eval", "model.generate, same prompts", False, "samples", nothing, generate_work),
]  # fmt: skip
