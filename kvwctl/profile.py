"""Stage 1: knowledge coefficients of a data split.

    kvwctl profile --model M --data retain.jsonl --split retain --out profile-retain.safetensors

Runs batched teacher-forced forward passes (the model's own processor and chat template, images
included) and adds up ``|a|``, the absolute input of every down projection, over the profiled
positions (DESIGN §1). Sums and counts are kept, not means, so that coefficients stay exactly
token-pooled however the samples are later grouped:

* a **retain** profile stores, per layer, ``layers.N.sum`` (m,) and one ``count`` () for the
  pooled split — ``C_r = sum / count``;
* a **forget** profile stores per-sample ``layers.N.sum`` (samples, m) and ``count`` (samples,),
  so the accessor can form forget batches of any size;
* a layer's routed experts (mixture of experts, ``kvwctl.experts``) add ``layers.N.experts.sum``
  and their own ``layers.N.experts.count`` of routed positions: (E, m) and (E,) for retain,
  (samples, E, m) and (samples, E) for forget. A layer with experts only has no ``layers.N.sum``.

Sums are float64, accumulated on the model's device; padding is never profiled. With
``redact`` the metadata's ``data`` path and ``sample_ids`` are keyed hashes (``kvwctl.redact``).
``plan_profile`` makes every check before the model is loaded (``kvwctl.plans``, ``--dry-run``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.artifacts import PROFILE_FORMAT, model_metadata, write_artifact
from kvwctl.checkpoint import Checkpoint, open_checkpoint
from kvwctl.conversation import RenderedSample
from kvwctl.data import Sample, load_samples
from kvwctl.distributed import World, gather_profile
from kvwctl.errors import Terminated, UsageError
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
from kvwctl.placement import Placement
from kvwctl.plans import batch_count, checkpoint_facts, data_facts, output_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.redact import Redactor
from kvwctl.resume import Checkpointer, Progress, check_sidecar, combine, load_progress, run_identity
from kvwctl.shards import parse_shard, part_metadata, shard_samples
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.visioncache import cache_directory

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
    written: bool = True  # False on a torchrun rank other than 0: rank 0 writes the profile

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints beside the path."""
        return {
            "split": self.split,
            "samples": self.num_samples,
            "positions": self.num_positions,
            "layers": self.num_layers,
            "model_fingerprint": self.fingerprint,
        }


BatchCallback = Callable[[Sequence[int], dict[str, "torch.Tensor"]], None]


def collect_sums(
    loaded: LoadedModel,
    rendered: list[RenderedSample],
    *,
    positions: str,
    batch_size: int,
    tracker: Tracker,
    description: str,
    on_batch: BatchCallback | None = None,
) -> dict[str, torch.Tensor]:
    """The per-sample rows of a profile, by tensor name: float64 sums ``layers.N.sum`` ``(samples, m)``
    for each dense (or shared-expert) down projection, ``layers.N.experts.sum`` ``(samples, E, m)``
    and the routed positions ``layers.N.experts.count`` ``(samples, E)`` for a layer's experts, and
    the profiled positions ``count`` ``(samples,)``.

    ``on_batch(indices, rows)`` is called after every batch with the positions of its samples in
    ``rendered`` and their rows (``(batch, ...)`` per name; resume checkpoints, ``kvwctl.resume``).
    Batches are formed from ``rendered`` alone, so the samples left after whole batches are batched
    as they were in the whole list: resume relies on it.
    """
    import torch

    batches = [range(start, min(start + batch_size, len(rendered))) for start in range(0, len(rendered), batch_size)]
    chunks: dict[str, list[torch.Tensor]] = {}
    with CoefficientCollector(loaded.down_projections, loaded.experts) as collector:
        for batch in tracker.track(batches, total=len(rendered), description=description, unit="samples", size=len):
            encoded = encode_batch(loaded, [rendered[index] for index in batch], positions=positions)
            parts, batch_counts = collector.run(loaded, encoded)
            rows: dict[str, torch.Tensor] = {}
            for part, (sums, part_count) in parts.items():
                rows[f"{part}.sum"] = sums  # (batch, m) or (batch, E, m)
                if part.endswith(".experts"):
                    rows[f"{part}.count"] = part_count  # (batch, E)
            rows["count"] = batch_counts  # (batch,)
            for name, tensor in rows.items():
                chunks.setdefault(name, []).append(tensor)
            if on_batch is not None:
                on_batch(batch, rows)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


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
    world: World | None = None  # under torchrun (kvwctl.distributed)
    command: str = "profile"

    def _uses_vision_cache(self) -> bool:
        return self.checkpoint.architecture.multimodal and cache_directory(self.options) is not None

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        options = self.options
        shard = str(self.world.shard) if self.world is not None else options.shard
        scale_out = {"shard": shard, "checkpoint_every": options.checkpoint_every, "resume": options.resume}
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
                **({"device_map": options.device_map} if options.device_map is not None else {}),
                **({"vision_cache": options.vision_cache} if self._uses_vision_cache() else {}),
                "dtype": self.dtype,
                "redact": options.redact,
                **{key: value for key, value in scale_out.items() if value},  # only those given
            },
            "outputs": [output_facts(self.out, "profile", force=options.force)],
        }


def plan_profile(
    model: ModelSpec, data: Path, out: Path, options: ProfileOptions, *, world: World | None = None
) -> ProfilePlan:
    """Every check ``run_profile`` makes before loading the model: data, checkpoint, output, shares."""
    import torch

    if world is not None and (options.shard or options.resume or options.checkpoint_every):
        given = "--shard" if options.shard else "--resume" if options.resume else "--checkpoint-every"
        raise UsageError(
            f"{given} does not apply under torchrun: the ranks share the samples",
            hint="run separate jobs with --shard K/N (each can --checkpoint-every and --resume), then profile merge",
        )
    samples = load_samples(data)
    shard = world.shard if world is not None else parse_shard(options.shard) if options.shard else None
    if world is not None and batch_count(len(samples), options.batch_size) < world.size:
        raise UsageError(
            f"{len(samples)} samples make {batch_count(len(samples), options.batch_size)} batches of "
            f"{options.batch_size}, too few for {world.size} torchrun ranks",
            hint="use fewer ranks (--nproc-per-node) or a smaller --batch-size",
        )
    if shard is not None:
        shard_samples(len(samples), options.batch_size, shard)  # enough batches for every shard
    checkpoint = open_checkpoint(resolve_model(model.reference, model.revision))
    images = [image for sample in samples for image in sample.images]
    check_outputs(files=[out], inputs=[*checkpoint.input_paths, data, *images], force=options.force)
    check_sidecar(out, resume=options.resume, force=options.force)
    placement = Placement.from_options(options)
    torch_device = (
        torch.device(world.device) if world is not None else select_device(options.device, placement=placement)
    )
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
        world=world,
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
        loaded = load_model(
            checkpoint,
            device=torch_device,
            dtype=torch_dtype,
            placement=Placement.from_options(plan.options),
            vision_cache=cache_directory(plan.options),
        )
    return write_profile(
        loaded, fingerprint, plan.samples, plan.data, plan.out, plan.options, tracker=tracker, world=plan.world
    )


def write_profile(
    loaded: LoadedModel,
    fingerprint: str,
    samples: list[Sample],
    data: Path,
    out: Path,
    options: ProfileOptions,
    *,
    tracker: Tracker,
    world: World | None = None,
) -> ProfileResult:
    """Profile ``samples`` (read from ``data``) on a loaded model and write the profile to ``out``.

    Used by ``execute_profile`` and by ``kvwctl tune``, which profiles with the model it has loaded.
    With ``--shard`` (or under torchrun, ``world``) only the shard's samples are profiled
    (``kvwctl.shards``); with ``--checkpoint-every`` / ``--resume`` the run checkpoints and resumes
    (``kvwctl.resume``). Under torchrun only rank 0 writes; the other ranks return a result with ``written=False``.
    """
    import torch

    split, positions, batch_size = options.split, options.positions, options.batch_size
    checkpoint, torch_device, torch_dtype = loaded.checkpoint, loaded.device, loaded.dtype
    redactor = Redactor.create(enabled=options.redact)
    rendered = render_all(loaded.renderer, samples)
    # Batches are formed in length order (little padding); shards, resume and checkpoints count
    # positions in that order, and the rows go back to data order at the end (or at the merge).
    order = length_order(rendered)  # position p holds sample order[p]
    shard = world.shard if world is not None else parse_shard(options.shard) if options.shard else None
    selection = shard_samples(len(samples), batch_size, shard) if shard is not None else range(len(samples))
    metadata = {
        "format": PROFILE_FORMAT,
        **model_metadata(checkpoint, fingerprint),
        "split": split,
        "data": redactor.text(str(data)),
        "data_sha256": file_sha256(data),
        "positions": positions,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "accumulation_dtype": "float64",
        "batch_size": str(batch_size),
        "device": str(torch_device),
        **({"device_map": json.dumps(loaded.placement.describe(loaded.model))} if loaded.placement else {}),
        **redactor.metadata(),
    }

    # Select the samples (a shard's, those a checkpoint has not done), profile them, reduce.
    identity = run_identity(metadata, shard=str(shard) if shard is not None else "", samples=selection)
    previous = load_progress(out, identity, selection) if options.resume else Progress()
    done = set(previous.sample_indices)
    remaining = [index for index in selection if index not in done]
    checkpointer = Checkpointer(out, identity, previous, positions=remaining, every=options.checkpoint_every)
    new = None
    if remaining:
        try:
            new = collect_sums(
                loaded,
                [rendered[order[position]] for position in remaining],
                positions=positions,
                batch_size=batch_size,
                tracker=tracker,
                description=f"profile {split}",
                on_batch=checkpointer,
            )
        except (KeyboardInterrupt, Terminated):
            checkpointer.save_unsaved()  # Ctrl-C or SIGTERM: keep the batches finished since the last checkpoint
            raise
    rows = combine(previous, remaining, new, torch_device)  # the selected positions' rows, in length order
    held = [order[position] for position in selection]  # the data index of each row
    if shard is None:  # every sample: rows in data order
        permutation = torch.tensor(sorted(range(len(held)), key=held.__getitem__), dtype=torch.int64)
        rows = {name: tensor.index_select(0, permutation.to(tensor.device)) for name, tensor in rows.items()}
        held = sorted(held)
    counts = rows["count"]  # (samples,)
    tensors = profile_tensors(split, rows)
    metadata |= {
        "num_samples": str(len(selection)),
        "num_positions": str(int(counts.sum())),
        "sample_ids": json.dumps(redactor.ids([samples[index].id for index in held])),
    }
    if world is not None:
        metadata = part_metadata(metadata, world.shard, selection, len(samples), held)
        merged = gather_profile(world, tensors, metadata, out=out)
        if merged is None:  # not rank 0: the profile is rank 0's to write
            return ProfileResult(
                out, split, len(selection), int(counts.sum()), checkpoint.num_layers, fingerprint, written=False
            )
        tensors, metadata = merged
        metadata["sample_ids"] = json.dumps(redactor.ids([sample.id for sample in samples]))  # one redaction key
        selection = range(len(samples))
    elif shard is not None:
        metadata = part_metadata(metadata, shard, selection, len(samples), held)
    write_artifact(out, tensors, metadata)
    checkpointer.remove()
    return ProfileResult(
        path=out,
        split=split,
        num_samples=len(selection),
        num_positions=int(metadata["num_positions"]),
        num_layers=checkpoint.num_layers,
        fingerprint=fingerprint,
    )


def profile_tensors(split: str, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A profile's tensors from per-sample rows (``collect_sums``): pooled over the samples for
    retain (``layers.N.sum`` (m,), experts (E, m) and (E,), ``count`` ()), as they are for forget."""
    if split == "retain":
        return {name: tensor.sum(dim=0).cpu() for name, tensor in rows.items()}
    return {name: tensor.cpu() for name, tensor in rows.items()}
