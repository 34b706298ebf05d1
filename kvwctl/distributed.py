"""Data-parallel profiling under ``torchrun``: every rank a share of the samples, rank 0 writes.

    torchrun --nproc-per-node 4 -m kvwctl profile --split retain --model M --data retain.jsonl

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with a world of more than one process
``kvwctl profile`` initialises ``torch.distributed`` once (NCCL when the ranks run on CUDA, gloo on the
CPU; a process group the caller initialised is used as it is). Rank ``r`` runs on
``cuda:LOCAL_RANK`` (``--device auto`` or ``cuda``) or the CPU (``--device cpu``, or ``auto``
without CUDA) and profiles the share of shard ``r+1`` of the world size (``kvwctl.shards``: whole
batches of the single run). At the end the ranks' sums and counts are gathered on rank 0, which
merges them exactly as ``kvwctl profile merge`` merges shard files (retain: the pooled float64
sums added in rank order; forget: the per-sample rows in sample order) and alone writes the
profile (atomically) and prints; the other ranks print nothing but errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvwctl.artifacts import Artifact
from kvwctl.errors import KvwError, UsageError
from kvwctl.shards import Shard, merge_parts

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun world."""

    rank: int
    size: int
    local_rank: int
    device: str  # the torch device this rank profiles on
    backend: str  # nccl or gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank + 1, self.size)


def environment_rank(environment: Mapping[str, str] | None = None) -> int:
    """``RANK`` as torchrun sets it (0 outside a world): ranks above 0 print nothing."""
    environment = os.environ if environment is None else environment
    world = _world_variables(environment)
    return world[0] if world is not None else 0


def _world_variables(environment: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None for a single process."""
    if "WORLD_SIZE" not in environment:
        return None
    values = {name: environment.get(name, "0") for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if not all(value.isdecimal() for value in values.values()):
        shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
        raise UsageError(f"torchrun's variables are not integers: {shown}")
    size, rank, local_rank = (int(values[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if size <= 1:
        return None
    if rank >= size:
        raise UsageError(f"RANK {rank} is not below WORLD_SIZE {size}")
    return rank, size, local_rank


def rank_device(name: str, local_rank: int) -> str:
    """The device of a rank for a ``--device`` value: ``cuda:LOCAL_RANK`` for auto/cuda with CUDA, else cpu."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if name not in ("auto", "cuda"):
        raise UsageError(
            f"--device {name} under torchrun: every rank runs on cuda:LOCAL_RANK",
            hint="pass --device cuda (or auto), or cpu; choose the GPUs with CUDA_VISIBLE_DEVICES",
        )
    if not torch.cuda.is_available():
        raise KvwError(f"--device {name} was asked for but CUDA is not available", hint="use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise KvwError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible")
    return f"cuda:{local_rank}"


@contextmanager
def torchrun_world(device: str, environment: Mapping[str, str] | None = None) -> Iterator[World | None]:
    """This process's ``World`` under torchrun (the process group initialised once), else None."""
    variables = _world_variables(os.environ if environment is None else environment)
    if variables is None:
        yield None
        return
    import torch
    import torch.distributed as dist

    rank, size, local_rank = variables
    rank_device_name = rank_device(device, local_rank)
    backend = "nccl" if rank_device_name.startswith("cuda") else "gloo"
    initialised_here = not dist.is_initialized()
    if initialised_here:
        if backend == "nccl":
            torch.cuda.set_device(rank_device_name)
        dist.init_process_group(backend)
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, device=rank_device_name, backend=backend)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def gather_profile(
    world: World,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    out: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Every rank's part (a partial profile in memory) gathered and merged on rank 0; None elsewhere."""
    import torch.distributed as dist

    # Every rank's tensors (host copies: layers.N.sum, experts' sums and counts, count) and metadata
    # gathered as objects on rank 0: one call for any set of tensor names, with NCCL and gloo alike.
    local = {name: tensor.cpu() for name, tensor in tensors.items()}
    gathered: list[object] | None = [None] * world.size if world.is_main else None
    dist.gather_object((local, metadata), gathered, dst=0)
    if gathered is None:
        return None
    parts = []
    for rank, item in enumerate(gathered):
        assert isinstance(item, tuple), "every rank sends its (tensors, metadata)"
        rank_tensors, rank_metadata = item
        parts.append(Artifact(path=Path(f"{out} (rank {rank})"), metadata=rank_metadata, tensors=rank_tensors))
    return merge_parts(parts)
