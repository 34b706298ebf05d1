"""Stage 1: knowledge coefficients of a data split.

    kvwctl profile --model M --data retain.jsonl --split retain --out profile-retain.safetensors

Runs batched teacher-forced forward passes (the model's own processor and chat template, images
included) and adds up ``|a|``, the absolute input of every down projection, over the profiled
positions (DESIGN §1). Sums and counts are kept, not means, so that coefficients stay exactly
token-pooled however the samples are later grouped:

* a **retain** profile stores, per layer, ``layers.N.sum`` (m,) and one ``count`` () for the
  pooled split — ``C_r = sum / count``;
* a **forget** profile stores per-sample ``layers.N.sum`` (samples, m) and ``count`` (samples,),
  so the accessor can form forget batches of any size.

Sums are float64, accumulated on the model's device; padding is never profiled. With
``redact`` the metadata's ``data`` path and ``sample_ids`` are keyed hashes (``kvwctl.redact``).
``plan_profile`` makes every check before the model is loaded (``kvwctl.plans``, ``--dry-run``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.artifacts import PROFILE_FORMAT, model_metadata, write_artifact
from kvwctl.checkpoint import Checkpoint, open_checkpoint
from kvwctl.conversation import RenderedSample
from kvwctl.data import Sample, load_samples
from kvwctl.files import file_sha256
from kvwctl.modeling import (
    CoefficientCollector,
    LoadedModel,
    encode_batch,
    length_order,
    load_model,
    render_all,
    select_device,
    select_dtype,
)
from kvwctl.options import ProfileOptions
from kvwctl.outputs import check_outputs
from kvwctl.plans import batch_count, checkpoint_facts, data_facts, output_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.redact import Redactor
from kvwctl.source import ModelSpec, resolve_model

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProfileResult:
    path: Path
    split: str
    num_samples: int
    num_positions: int
    num_layers: int
    fingerprint: str

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints beside the path."""
        return {
            "split": self.split,
            "samples": self.num_samples,
            "positions": self.num_positions,
            "layers": self.num_layers,
            "model_fingerprint": self.fingerprint,
        }


def collect_sums(
    loaded: LoadedModel,
    rendered: list[RenderedSample],
    *,
    positions: str,
    batch_size: int,
    tracker: Tracker,
    description: str,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample float64 sums ``(samples, m)`` for every layer, and counts ``(samples,)``.

    The samples are batched in order of length (``length_order``: any order of the same samples
    gives the same batches), which cuts padding; the rows are returned in the order of
    ``rendered``. Sums stay on the device until the end.
    """
    import torch

    order = length_order(rendered)
    ordered = [rendered[index] for index in order]
    layer_sums: list[list[torch.Tensor]] = [[] for _ in loaded.down_projections]
    counts: list[torch.Tensor] = []
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    with CoefficientCollector(loaded.down_projections) as collector:
        for batch in tracker.track(batches, total=len(rendered), description=description, unit="samples", size=len):
            sums, batch_counts = collector.run(loaded, encode_batch(loaded, batch, positions=positions))
            for layer, layer_batch in enumerate(sums):
                layer_sums[layer].append(layer_batch)
            counts.append(batch_counts)
    # Row k of the batched results is sample order[k]; sample i is therefore row position[i].
    position = torch.empty(len(order), dtype=torch.int64)
    position[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    position = position.to(loaded.device)
    sample_sums = [torch.cat(chunks).index_select(0, position) for chunks in layer_sums]  # (samples, m) per layer
    return sample_sums, torch.cat(counts).index_select(0, position)  # and (samples,)


@dataclass(frozen=True)
class ProfilePlan:
    """A profile run resolved and checked: the checkpoint (headers only), the samples, the output."""

    model: ModelSpec
    checkpoint: Checkpoint
    data: Path
    samples: list[Sample]
    out: Path
    options: ProfileOptions
    device: str
    dtype: str
    command: str = "profile"

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        options = self.options
        return {
            "command": self.command,
            "model": checkpoint_facts(self.checkpoint),
            "layers": list(range(self.checkpoint.num_layers)),
            "data": {"split": options.split, **data_facts(self.data, self.samples)},
            "settings": {
                "positions": options.positions,
                "batch_size": options.batch_size,
                "batches": batch_count(len(self.samples), options.batch_size),
                "device": self.device,
                "dtype": self.dtype,
                "redact": options.redact,
            },
            "outputs": [output_facts(self.out, "profile", force=options.force)],
        }


def plan_profile(model: ModelSpec, data: Path, out: Path, options: ProfileOptions) -> ProfilePlan:
    """Every check ``run_profile`` makes before loading the model: data, checkpoint, output."""
    samples = load_samples(data)
    checkpoint = open_checkpoint(resolve_model(model.reference, model.revision))
    images = [image for sample in samples for image in sample.images]
    check_outputs(files=[out], inputs=[*checkpoint.input_paths, data, *images], force=options.force)
    torch_device = select_device(options.device)
    torch_dtype = select_dtype(options.dtype, torch_device, checkpoint.config)
    return ProfilePlan(
        model=model,
        checkpoint=checkpoint,
        data=data,
        samples=samples,
        out=out,
        options=options,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
    )


def run_profile(
    model: ModelSpec, data: Path, out: Path, options: ProfileOptions, *, tracker: Tracker | None = None
) -> ProfileResult:
    """Profile ``data`` on ``model`` and write the profile to ``out`` (see the module docstring)."""
    return execute_profile(plan_profile(model, data, out, options), tracker=tracker)


def execute_profile(plan: ProfilePlan, *, tracker: Tracker | None = None) -> ProfileResult:
    """The work of a planned profile run: fingerprint, load the model, profile, write."""
    import torch

    tracker = tracker or NullTracker()
    checkpoint = plan.checkpoint
    fingerprint = checkpoint.fingerprint()
    torch_device = torch.device(plan.device)
    torch_dtype = getattr(torch, plan.dtype)
    with tracker.status(f"Loading {plan.model.reference}"):
        loaded = load_model(checkpoint, device=torch_device, dtype=torch_dtype)
    return write_profile(loaded, fingerprint, plan.samples, plan.data, plan.out, plan.options, tracker=tracker)


def write_profile(
    loaded: LoadedModel,
    fingerprint: str,
    samples: list[Sample],
    data: Path,
    out: Path,
    options: ProfileOptions,
    *,
    tracker: Tracker,
) -> ProfileResult:
    """Profile ``samples`` (read from ``data``) on a loaded model and write the profile to ``out``.

    Used by ``execute_profile`` and by ``kvwctl tune``, which profiles with the model it has loaded.
    """

    split, positions, batch_size = options.split, options.positions, options.batch_size
    checkpoint, torch_device, torch_dtype = loaded.checkpoint, loaded.device, loaded.dtype
    redactor = Redactor.create(enabled=options.redact)
    rendered = render_all(loaded.renderer, samples)

    sums, counts = collect_sums(
        loaded, rendered, positions=positions, batch_size=batch_size, tracker=tracker, description=f"profile {split}"
    )
    tensors: dict[str, torch.Tensor] = {}
    if split == "retain":
        for layer, layer_sums in enumerate(sums):
            tensors[f"layers.{layer}.sum"] = layer_sums.sum(dim=0).cpu()  # (m,)
        tensors["count"] = counts.sum().cpu()  # ()
    else:
        for layer, layer_sums in enumerate(sums):
            tensors[f"layers.{layer}.sum"] = layer_sums.cpu()  # (samples, m)
        tensors["count"] = counts.cpu()  # (samples,)
    metadata = {
        "format": PROFILE_FORMAT,
        **model_metadata(checkpoint, fingerprint),
        "split": split,
        "data": redactor.text(str(data)),
        "data_sha256": file_sha256(data),
        "num_samples": str(len(samples)),
        "num_positions": str(int(counts.sum())),
        "positions": positions,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "accumulation_dtype": "float64",
        "batch_size": str(batch_size),
        "device": str(torch_device),
        "sample_ids": json.dumps(redactor.ids([sample.id for sample in samples])),
        **redactor.metadata(),
    }
    write_artifact(out, tensors, metadata)
    return ProfileResult(
        path=out,
        split=split,
        num_samples=len(samples),
        num_positions=int(counts.sum()),
        num_layers=checkpoint.num_layers,
        fingerprint=fingerprint,
    )
