"""Stage 3: a new checkpoint with the forget-specific knowledge vectors weakened.

One-shot (exposure from ``kvwctl accessor``, all computed on the original model)::

    kvwctl apply --model M --accessor accessor.safetensors --gamma 0.02 --layers 2:26 --out unlearned/

Progressive (the paper's Algorithm 1: for each forget batch, forward the *current* model,
compute ``A_b`` and weaken layers ``l_s..l_e`` before the next batch)::

    kvwctl apply --model M --progressive --forget-data forget.jsonl --retain profile-retain.safetensors \
                 --gamma 0.02 --layers 2:26 --out unlearned/

Both write the checkpoint the same way. Each input shard is copied byte for byte and only the
byte ranges of the edited down-projection weights are overwritten, so every other tensor, the
shard layout, the index and the headers are identical to the input. An edited weight is
``W * exp(-gamma * E)`` along the vector axis, computed in float32 from the **original** stored
weight and rounded once to the stored dtype. The directory is staged beside ``--out`` and renamed
into place at the end, with ``kvw_manifest.json`` recording how it was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.accessor import (
    batch_ranges,
    exposure_metadata,
    forget_accessor,
    pooled_coefficient,
    retain_coefficients,
    summarize,
)
from kvwctl.artifacts import ACCESSOR_FORMAT, PROFILE_FORMAT, check_fits_model, read_artifact, write_artifact
from kvwctl.checkpoint import (
    MANIFEST_FILE,
    Checkpoint,
    ModelSource,
    carry_over_files,
    copy_patched_shard,
    open_checkpoint,
    resolve_model,
)
from kvwctl.config import parse_layers
from kvwctl.console import NullTracker, Tracker
from kvwctl.data import load_samples
from kvwctl.errors import ArtifactError, KvwError
from kvwctl.files import (
    check_output_dir,
    check_output_file,
    file_sha256,
    now,
    staged_output_dir,
    write_json_atomically,
)

if TYPE_CHECKING:
    import torch

EXPOSURE_FILE = "exposure.safetensors"


# --- pure tensor functions -----------------------------------------------------------------------


def gates(exposure: torch.Tensor, gamma: float) -> torch.Tensor:
    """``g = exp(-gamma * E)`` in float32."""
    return (exposure.float() * -gamma).exp()


def scale_vectors(weight: torch.Tensor, gate: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Scale knowledge vector ``i`` of ``weight`` by ``gate[i]``; float32, rounded once.

    ``axis`` indexes the vectors: 1 for ``nn.Linear`` weights ``(d_model, m)`` (columns),
    0 for ``Conv1D`` weights ``(m, d_model)`` (rows).
    """
    if weight.shape[axis] != gate.numel():
        raise ValueError(
            f"weight {tuple(weight.shape)} has {weight.shape[axis]} vectors on axis {axis}, gate has {gate.numel()}"
        )
    shape = [1, 1]
    shape[axis] = -1
    return (weight.float() * gate.to(weight.device).float().reshape(shape)).to(weight.dtype)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- writing a weakened checkpoint ---------------------------------------------------------------


@dataclass(frozen=True)
class ApplyResult:
    path: Path
    manifest: dict[str, Any]


def write_weakened_checkpoint(
    checkpoint: Checkpoint,
    exposures: list[torch.Tensor],
    *,
    gamma: float,
    layers: list[int],
    out: Path,
    force: bool,
    device: torch.device,
    input_fingerprint: str,
    provenance: dict[str, Any],
    tracker: Tracker,
) -> ApplyResult:
    """Stream the input shards one at a time, weaken the chosen layers, write ``out`` atomically."""
    from safetensors import safe_open

    axis = checkpoint.architecture.vector_axis
    edits = {layer: checkpoint.down_projections[layer] for layer in layers}
    layer_stats: dict[str, Any] = {}
    shard_hashes: dict[str, str] = {}
    with staged_output_dir(out, force=force) as staging:
        left_out = carry_over_files(checkpoint.path, staging, skip={*checkpoint.shards, MANIFEST_FILE})
        for shard in tracker.track(checkpoint.shards, total=len(checkpoint.shards), description="apply"):
            patches: dict[tuple[int, int], bytes] = {}
            shard_edits = [projection for projection in edits.values() if projection.shard == shard]
            if shard_edits:
                with safe_open(str(checkpoint.path / shard), framework="pt", device=str(device)) as stream:
                    for projection in shard_edits:
                        weight = stream.get_tensor(projection.name)
                        gate = gates(exposures[projection.layer].to(device), gamma)  # (m,)
                        weakened = scale_vectors(weight, gate, axis=axis)
                        patches[(projection.data_start, projection.data_end)] = tensor_bytes(weakened)
                        layer_stats[str(projection.layer)] = {
                            "tensor": projection.name,
                            "vectors": gate.numel(),
                            "scaled": int((gate < 1).sum()),
                            "min_gate": float(gate.min()),
                            "mean_gate": float(gate.double().mean()),
                        }
            copy_patched_shard(checkpoint.path / shard, staging / shard, patches)
            shard_hashes[shard] = file_sha256(staging / shard)
        previous = checkpoint.path / MANIFEST_FILE
        manifest = {
            "tool": "kvwctl",
            "tool_version": __version__,
            "created": now(),
            "input_model": {
                **checkpoint.source.describe(),
                "fingerprint": input_fingerprint,
                "model_type": checkpoint.architecture.model_type,
            },
            **provenance,
            "gamma": gamma,
            "layers": layers,
            "vector_axis": axis,
            "scaling": "W * exp(-gamma * E) per knowledge vector, float32, rounded once to the stored dtype",
            "per_layer": {key: layer_stats[key] for key in sorted(layer_stats, key=int)},
            "shards": shard_hashes,
            "not_carried_over": left_out,
            "output_fingerprint": open_checkpoint(ModelSource(staging, str(staging), None)).fingerprint(),
            "previous_manifest": json.loads(previous.read_text()) if previous.is_file() else None,
        }
        write_json_atomically(staging / MANIFEST_FILE, manifest, ensure_ascii=True)
    return ApplyResult(path=out, manifest=manifest)


def _check_gamma(gamma: float) -> None:
    if not gamma >= 0:  # also rejects NaN
        raise KvwError(f"--gamma must be a non-negative number, got {gamma}")


# --- one-shot ------------------------------------------------------------------------------------


def run_apply(
    model: str,
    accessor: Path,
    out: Path,
    *,
    gamma: float,
    layers: str,
    revision: str | None = None,
    device: str = "auto",
    force: bool = False,
    tracker: Tracker | None = None,
) -> ApplyResult:
    from kvwctl.modeling import select_device

    _check_gamma(gamma)
    source = resolve_model(model, revision)
    check_output_dir(out, inputs=[source.path], force=force)
    checkpoint = open_checkpoint(source)
    selected = parse_layers(layers, checkpoint.num_layers)
    artifact = read_artifact(accessor, ACCESSOR_FORMAT)
    fingerprint = checkpoint.fingerprint()
    check_fits_model(artifact, checkpoint, fingerprint)
    exposures = []
    for layer in range(checkpoint.num_layers):
        exposure = artifact.layer_tensor(layer, "exposure")
        if exposure.numel() != checkpoint.num_vectors(layer):
            raise ArtifactError(
                f"{accessor}: layer {layer} has {exposure.numel()} exposures; the model has "
                f"{checkpoint.num_vectors(layer)} knowledge vectors"
            )
        exposures.append(exposure)
    provenance = {
        "mode": "one-shot",
        "accessor": {
            "path": str(accessor),
            "sha256": file_sha256(accessor),
            "batch_size": int(artifact.metadata["batch_size"]),
            "mode": artifact.metadata["mode"],
        },
    }
    return write_weakened_checkpoint(
        checkpoint,
        exposures,
        gamma=gamma,
        layers=selected,
        out=out,
        force=force,
        device=select_device(device),
        input_fingerprint=fingerprint,
        provenance=provenance,
        tracker=tracker or NullTracker(),
    )


# --- progressive (Algorithm 1) -------------------------------------------------------------------


def run_progressive(
    model: str,
    forget_data: Path,
    retain_profile: Path,
    out: Path,
    *,
    gamma: float,
    layers: str,
    revision: str | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    exposure_out: Path | None = None,
    tracker: Tracker | None = None,
) -> ApplyResult:
    """Algorithm 1: per forget batch, forward the current model, compute ``A_b``, weaken.

    The cumulative exponent ``E = sum_b A_b`` is kept per vector (float64 on the device) and the
    working weights are derived from the original ones at every step, ``W_0 * exp(-gamma * E)``,
    so rounding to the model's dtype never compounds. The exposure applied is written beside the
    checkpoint in the accessor format (``exposure.safetensors`` unless ``exposure_out`` is given),
    so one-shot and progressive runs compare file to file.
    """
    import torch

    from kvwctl.modeling import CoefficientCollector, encode_batch, load_model, render_all, select_device, select_dtype

    _check_gamma(gamma)
    if batch_size < 1:
        raise KvwError(f"--batch-size must be at least 1, got {batch_size}")
    tracker = tracker or NullTracker()
    source = resolve_model(model, revision)
    check_output_dir(out, inputs=[source.path], force=force)
    exposure_path = exposure_out or out.parent / f"{out.name}.{EXPOSURE_FILE}"
    check_output_file(exposure_path, force=force)
    checkpoint = open_checkpoint(source)
    selected = parse_layers(layers, checkpoint.num_layers)
    retain = read_artifact(retain_profile, PROFILE_FORMAT)
    if retain.metadata.get("split") != "retain":
        raise ArtifactError(f"{retain_profile} is a {retain.metadata.get('split')} profile; expected a retain profile")
    fingerprint = checkpoint.fingerprint()
    check_fits_model(retain, checkpoint, fingerprint)
    positions = retain.metadata["positions"]
    samples = load_samples(forget_data)

    torch_device = select_device(device)
    loaded = load_model(checkpoint, device=torch_device, dtype=select_dtype(dtype, torch_device, checkpoint.config))
    rendered = render_all(loaded.renderer, samples)
    retain_by_layer = [coefficient.to(torch_device) for coefficient in retain_coefficients(retain)]
    modules = loaded.down_projections
    # The weights as loaded, kept to derive every step's weights from (no compounding rounding).
    originals = {layer: modules[layer].weight.detach().clone() for layer in selected}
    cumulative = [torch.zeros_like(coefficient) for coefficient in retain_by_layer]  # float64 (m,) per layer
    axis = checkpoint.architecture.vector_axis
    batches = batch_ranges(len(rendered), batch_size)
    with CoefficientCollector(modules) as collector:
        for batch in tracker.track(batches, total=len(batches), description="progressive"):
            encoded = encode_batch(loaded, rendered[batch.start : batch.stop], positions=positions)
            sums, counts = collector.run(loaded, encoded)
            for layer, layer_sums in enumerate(sums):
                accessor = forget_accessor(pooled_coefficient(layer_sums, counts), retain_by_layer[layer])
                cumulative[layer] += accessor
            with torch.no_grad():
                for layer in selected:
                    gate = gates(cumulative[layer], gamma)
                    modules[layer].weight.copy_(scale_vectors(originals[layer], gate, axis=axis))
    exposures = [exposure.float().cpu() for exposure in cumulative]
    del loaded, originals, modules

    metadata = exposure_metadata(
        retain,
        mode="progressive",
        batches=batches,
        sample_ids=json.dumps([sample.id for sample in samples]),
        gamma=repr(gamma),
        applied_layers=json.dumps(selected),
        forget_data=str(forget_data),
        forget_data_sha256=file_sha256(forget_data),
        retain_profile=str(retain_profile),
        retain_profile_sha256=file_sha256(retain_profile),
    )
    provenance = {
        "mode": "progressive",
        "progressive": {
            "forget_data": str(forget_data),
            "forget_data_sha256": metadata["forget_data_sha256"],
            "retain_profile": str(retain_profile),
            "retain_profile_sha256": metadata["retain_profile_sha256"],
            "batch_size": batch_size,
            "num_batches": len(batches),
            "positions": positions,
            "exposure_file": str(exposure_path),
            "layer_summary": [vars(summary) for summary in summarize(exposures)],
        },
    }
    result = write_weakened_checkpoint(
        checkpoint,
        exposures,
        gamma=gamma,
        layers=selected,
        out=out,
        force=force,
        device=torch_device,
        input_fingerprint=fingerprint,
        provenance=provenance,
        tracker=tracker,
    )
    write_artifact(
        exposure_path, {f"layers.{layer}.exposure": exposure for layer, exposure in enumerate(exposures)}, metadata
    )
    return result
