"""``--dry-run``: what a command would do, resolved and checked, without doing it.

Every stage's entry point is split in two: ``plan_<stage>(...)`` resolves the inputs and checks
them (data read and validated, checkpoint config and safetensors headers read, layers resolved,
stage files read and checked, every output checked against the inputs and ``--force``), and
returns a frozen plan; ``execute_<stage>(plan)`` does the work (loads the model, reads the
weights, writes). ``run_<stage>`` is the two in a row. A dry run stops after the plan: the CLI
prints :meth:`Plan.facts` as a table on stderr (``--json``: as JSON on stdout) and exits 0,
having written nothing and loaded no weight.

The one check a plan cannot make is the **model fingerprint** (a hash over every tensor byte):
that a stage file was made from this very model is checked by the real run.

    plan = plan_profile(spec, data, out, options)
    plan.facts()        # {"command": "profile", "model": {...}, "data": {...}, "outputs": [...], ...}
    execute_profile(plan, tracker=tracker)

This module holds the facts every plan shares; each stage module holds its own plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvwctl.checkpoint import Checkpoint
    from kvwctl.data import Sample


class Plan(Protocol):
    """What a dry run prints: a command name and its facts (JSON-ready)."""

    @property
    def command(self) -> str: ...

    def facts(self) -> dict[str, Any]: ...


def checkpoint_facts(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint as opened (config and headers only): reference, revision, layers, shards and sizes."""
    sizes = {shard: (checkpoint.path / shard).stat().st_size for shard in checkpoint.shards}
    return {
        "reference": checkpoint.source.reference,
        "revision": checkpoint.source.revision,
        "path": str(checkpoint.path),
        "model_type": checkpoint.architecture.model_type,
        "architectures": checkpoint.config.get("architectures"),
        "num_layers": checkpoint.num_layers,
        "vectors_per_layer": sorted({checkpoint.num_vectors(layer) for layer in range(checkpoint.num_layers)}),
        **_expert_facts(checkpoint),
        "shards": sizes,
        "shard_bytes": sum(sizes.values()),
        "tensors": len(checkpoint.tensors),
    }


def _expert_facts(checkpoint: Checkpoint) -> dict[str, Any]:
    """Mixture of experts: the layers with routed experts, experts per layer and vectors per expert."""
    found = [experts for layer in range(checkpoint.num_layers) if (experts := checkpoint.experts(layer)) is not None]
    if not found:
        return {}
    return {
        "expert_layers": [experts.layer for experts in found],
        "experts_per_layer": sorted({experts.num_experts for experts in found}),
        "vectors_per_expert": sorted({experts.num_vectors for experts in found}),
    }


def edited_tensors(checkpoint: Checkpoint, layer: int) -> str | list[str]:
    """The stored tensors weakening ``layer`` rewrites: a name, or a list (mixture of experts)."""
    names = checkpoint.edited_tensor_names(layer)
    return names[0] if len(names) == 1 and checkpoint.experts(layer) is None else names


def data_facts(path: Path, samples: list[Sample]) -> dict[str, Any]:
    """A data file as read and validated: its path, samples, images and samples with options."""
    return {
        "path": str(path),
        "samples": len(samples),
        "images": sum(len(sample.images) for sample in samples),
        "with_options": sum(1 for sample in samples if sample.options),
    }


def output_facts(path: Path, kind: str, *, force: bool) -> dict[str, Any]:
    """An output as checked: where it goes, whether it exists and so would be replaced (``--force``)."""
    exists = path.exists() or path.is_symlink()
    return {"path": str(path), "kind": kind, "exists": exists, "replaced": exists and force}


def batch_count(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)
