"""Stage 2: the Forget Knowledge Accessor and the exposure of every knowledge vector.

    kvwctl accessor --forget profile-forget.safetensors --retain profile-retain.safetensors \
                    --batch-size 1 --out accessor.safetensors

For a forget batch ``b`` (``--batch-size`` consecutive forget samples, 1 by default as the
authors ran it), with ``C_f^b`` the token-pooled coefficient of the batch and ``C_r`` that of
the whole retain set:

    A_b = max(0, log(C_f^b + eps) - log(C_r + eps)),   eps = 1e-12
    E   = sum_b A_b                                      (the exposure, per layer and vector)

``apply`` then scales vector ``i`` by ``exp(-gamma * E_i)``. The file stores ``layers.N.exposure``
(m,) float32 and, with ``--save-batches``, ``layers.N.batch_accessor`` (batches, m).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvwctl import __version__
from kvwctl.artifacts import (
    ACCESSOR_FORMAT,
    PROFILE_FORMAT,
    Artifact,
    check_same_model,
    read_artifact,
    write_artifact,
)
from kvwctl.errors import ArtifactError, KvwError
from kvwctl.files import check_output_file, file_sha256, now

if TYPE_CHECKING:
    import torch

EPSILON = 1e-12


# --- pure tensor functions -----------------------------------------------------------------------


def batch_ranges(num_samples: int, batch_size: int) -> list[range]:
    """Consecutive forget batches of ``batch_size`` samples; the last one may be smaller."""
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def pooled_coefficient(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-pooled coefficient ``sum_t |a_t| / |T|`` from per-sample sums ``(samples, m)``.

    Pooling adds the sums and the counts before dividing: a mean over every profiled position,
    not a mean of per-sample means.
    """
    return sums.sum(dim=0) / counts.sum()  # (m,)


def forget_accessor(forget: torch.Tensor, retain: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """``A = max(0, log(C_f + eps) - log(C_r + eps))``, elementwise."""
    return ((forget + epsilon).log() - (retain + epsilon).log()).clamp(min=0)


def batch_accessors(
    forget_sums: torch.Tensor, forget_counts: torch.Tensor, retain: torch.Tensor, batches: list[range]
) -> torch.Tensor:
    """``A_b`` for every batch: ``(batches, m)`` from per-sample sums ``(samples, m)``."""
    import torch

    return torch.stack(
        [
            forget_accessor(
                pooled_coefficient(forget_sums[batch.start : batch.stop], forget_counts[batch.start : batch.stop]),
                retain,
            )
            for batch in batches
        ]
    )


# --- file-to-file entry point --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    vectors: int
    exposed: int  # vectors with E > 0
    max_exposure: float
    mean_exposure: float


@dataclass(frozen=True)
class AccessorResult:
    path: Path
    num_batches: int
    batch_size: int
    layers: list[LayerSummary]


def summarize(exposures: list[torch.Tensor]) -> list[LayerSummary]:
    return [
        LayerSummary(
            layer=layer,
            vectors=exposure.numel(),
            exposed=int((exposure > 0).sum()),
            max_exposure=float(exposure.max()),
            mean_exposure=float(exposure.double().mean()),
        )
        for layer, exposure in enumerate(exposures)
    ]


def load_profiles(forget_path: Path, retain_path: Path) -> tuple[Artifact, Artifact]:
    forget = read_artifact(forget_path, PROFILE_FORMAT)
    retain = read_artifact(retain_path, PROFILE_FORMAT)
    for artifact, split in ((forget, "forget"), (retain, "retain")):
        if artifact.metadata.get("split") != split:
            raise ArtifactError(
                f"{artifact.path} is a {artifact.metadata.get('split')} profile; expected a {split} profile",
                hint=f"make it with kvwctl profile --split {split}",
            )
    check_same_model(forget, retain)
    if forget.metadata["positions"] != retain.metadata["positions"]:
        raise ArtifactError(
            f"{forget.path} profiles positions {forget.metadata['positions']!r} but {retain.path} "
            f"profiles {retain.metadata['positions']!r}",
            hint="profile both splits with the same --positions",
        )
    return forget, retain


def retain_coefficients(retain: Artifact) -> list[torch.Tensor]:
    """``C_r`` per layer, float64 (m,)."""
    count = retain.tensors["count"]
    return [retain.layer_tensor(layer, "sum") / count for layer in range(retain.num_layers)]


def exposure_metadata(
    made_from: Artifact, *, mode: str, batches: list[range], sample_ids: str, **extra: str
) -> dict[str, str]:
    """Metadata of an exposure file (accessor format), for both one-shot and progressive runs."""
    model_keys = ("model", "model_revision", "model_fingerprint", "model_type", "num_layers")
    return {
        "format": ACCESSOR_FORMAT,
        **{key: made_from.metadata[key] for key in model_keys},
        "tool_version": __version__,
        "created": now(),
        "mode": mode,
        "positions": made_from.metadata["positions"],
        "batch_size": str(len(batches[0])),
        "num_batches": str(len(batches)),
        "batches": json.dumps([[batch.start, batch.stop] for batch in batches]),
        "sample_ids": sample_ids,
        "epsilon": repr(EPSILON),
        **extra,
    }


def run_accessor(
    forget_profile: Path,
    retain_profile: Path,
    out: Path,
    *,
    batch_size: int = 1,
    save_batches: bool = False,
    force: bool = False,
) -> AccessorResult:
    if batch_size < 1:
        raise KvwError(f"--batch-size must be at least 1, got {batch_size}")
    check_output_file(out, force=force)
    forget, retain = load_profiles(forget_profile, retain_profile)
    counts = forget.tensors["count"]  # (samples,)
    batches = batch_ranges(counts.numel(), batch_size)
    retain_by_layer = retain_coefficients(retain)
    tensors = {}
    exposures = []
    for layer in range(forget.num_layers):
        sums = forget.layer_tensor(layer, "sum")  # (samples, m)
        if sums.shape[1:] != retain_by_layer[layer].shape:
            raise ArtifactError(
                f"layer {layer}: {forget.path} has {sums.shape[1]} vectors, {retain.path} has "
                f"{retain_by_layer[layer].shape[0]}"
            )
        accessors = batch_accessors(sums, counts, retain_by_layer[layer], batches)  # (batches, m) float64
        exposure = accessors.sum(dim=0).float()  # (m,)
        exposures.append(exposure)
        tensors[f"layers.{layer}.exposure"] = exposure
        if save_batches:
            tensors[f"layers.{layer}.batch_accessor"] = accessors.float()
    metadata = exposure_metadata(
        forget,
        mode="one-shot",
        batches=batches,
        sample_ids=forget.metadata.get("sample_ids", "[]"),
        forget_profile=str(forget_profile),
        forget_profile_sha256=file_sha256(forget_profile),
        retain_profile=str(retain_profile),
        retain_profile_sha256=file_sha256(retain_profile),
    )
    write_artifact(out, tensors, metadata)
    return AccessorResult(path=out, num_batches=len(batches), batch_size=batch_size, layers=summarize(exposures))
