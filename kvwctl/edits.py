"""Which stored tensors weakening a layer rewrites, and how each is scaled.

A layer has up to two parts (``kvwctl.method.dense_part``/``experts_part``): its dense (or
shared-expert) down projection, whose exposure is ``(m,)``, and its routed experts, whose exposure
is ``(E, m)``. On disk the experts are one 2-D weight per expert (scaled by its row ``gate[e]``,
vectors on axis 1) or one fused 3-D tensor (scaled by the whole ``gate`` along its vector axis).
``apply`` (the files) and ``verify`` use the same :func:`weakened_tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvwctl.checkpoint import Checkpoint, StoredTensor
from kvwctl.errors import ArtifactError
from kvwctl.method import dense_part, experts_part, scale_expert_vectors, scale_vectors

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StoredEdit:
    """One stored tensor to weaken: the part whose gates scale it and how they apply."""

    tensor: StoredTensor
    layer: int
    part: str
    expert: int | None  # a per-expert 2-D weight: its row of the part's (E, m) gates
    fused: bool  # a fused (E, ., .) tensor: the whole (E, m) gates
    axis: int  # the tensor's vector axis


def part_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The exposure shape of every part of the checkpoint, layer by layer, dense first."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(checkpoint.num_layers):
        if checkpoint.dense(layer) is not None:
            shapes[dense_part(layer)] = (checkpoint.num_vectors(layer),)
        experts = checkpoint.experts(layer)
        if experts is not None:
            shapes[experts_part(layer)] = (experts.num_experts, experts.num_vectors)
    return shapes


def check_exposure_parts(source: str, exposures: dict[str, torch.Tensor], checkpoint: Checkpoint) -> None:
    """Refuse exposures whose parts or shapes are not the checkpoint's, naming the first difference."""
    shapes = part_shapes(checkpoint)
    for part, shape in shapes.items():
        if part not in exposures:
            raise ArtifactError(f"{source} has no exposure for {part}; the model {checkpoint.source.reference} has it")
        if tuple(exposures[part].shape) != shape:
            raise ArtifactError(
                f"{source}: {part} has {list(exposures[part].shape)} exposures; the model has {list(shape)} knowledge vectors"
            )
    extra = sorted(set(exposures) - set(shapes))
    if extra:
        raise ArtifactError(
            f"{source} has exposures for {extra[0]}, which the model {checkpoint.source.reference} lacks"
        )


def stored_edits(checkpoint: Checkpoint, layers: Sequence[int]) -> list[StoredEdit]:
    """Every stored tensor that weakening ``layers`` rewrites."""
    edits = []
    for layer in layers:
        dense = checkpoint.dense(layer)
        if dense is not None:
            axis = checkpoint.architecture.vector_axis
            edits.append(StoredEdit(dense, layer, dense_part(layer), expert=None, fused=False, axis=axis))
        experts = checkpoint.experts(layer)
        for tensor in experts.tensors if experts is not None else ():
            fused = tensor.expert is None
            edits.append(StoredEdit(tensor, layer, experts_part(layer), tensor.expert, fused=fused, axis=tensor.axis))
    return edits


def edit_gates(edit: StoredEdit, part_gates: torch.Tensor) -> torch.Tensor:
    """The gates that scale this tensor: the part's ``(m,)`` or ``(E, m)``, or one expert's row ``(m,)``."""
    return part_gates[edit.expert] if edit.expert is not None else part_gates


def weakened_tensor(weight: torch.Tensor, edit: StoredEdit, part_gates: torch.Tensor) -> torch.Tensor:
    """``weight`` with each of its knowledge vectors scaled by its gate (float32, rounded once)."""
    if edit.fused:
        return scale_expert_vectors(weight, part_gates, axis=edit.axis)
    return scale_vectors(weight, edit_gates(edit, part_gates), axis=edit.axis)
